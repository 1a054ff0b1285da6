"""Loading models for the hf engine: paths, task detection, context lengths."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def resolve_model_path(path: str) -> tuple[str, bool]:
    """(where to load from, whether it is local). Raises for a missing local path."""
    p = os.path.expanduser(path)
    if os.path.isdir(p):
        return p, True
    if os.path.exists(p):
        raise ValueError(f"model path {path!r} is a file, not a model directory")
    if _HUB_ID.match(path) and not path.startswith("."):
        return path, False
    raise FileNotFoundError(f"model path not found: {path}")


@dataclass(eq=False)
class ServedModel:
    """One loaded model and what serves it."""

    path: str
    names: list[str]
    task: str  # "generate" | "embed"
    model: Any
    tokenizer: Any
    context_length: int
    embed_max_length: int
    runner: Any = None  # BatchRunner for causal LMs
    eos_ids: frozenset[int] = frozenset()
    vocab_size: int = 0
    token_text: dict[int, str] = field(default_factory=dict)
    # Characters of text one token stands for, at most (0: no such bound):
    # a prompt longer than context_length x this is refused untokenized.
    max_token_chars: int = 0

    def text_of(self, token: int) -> str:
        t = self.token_text.get(token)
        if t is None:
            t = self.token_text[token] = self.tokenizer.decode([token])
        return t


def load_model(
    where: str,
    local: bool,
    names: list[str],
    device: str = "auto",
    dtype_name: str = "auto",
    context_override: int | None = None,
    task: str | None = None,
) -> ServedModel:
    """Load one model with its tokenizer (blocking; run it in a thread)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    dtype: Any = dtype_name
    if dtype == "auto":
        dtype = torch.float32 if device == "cpu" else "auto"
    else:
        try:
            dtype = {
                "float32": torch.float32,
                "float16": torch.float16,
                "bfloat16": torch.bfloat16,
            }[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}") from None
    try:
        config = AutoConfig.from_pretrained(where, local_files_only=local)
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=local)
        causal = config_is_causal(config)
        task = task or ("generate" if causal else "embed")
        if task == "generate" and not causal:
            raise ValueError(f"{where!r} is not a causal LM: it can only serve embeddings")
        # A causal LM embeds from its hidden states, so it is always loaded whole.
        cls = AutoModelForCausalLM if causal else AutoModel
        model = cls.from_pretrained(where, dtype=dtype, local_files_only=local)
    except OSError as e:
        raise ValueError(f"cannot load model {where!r}: {e}") from e
    model.to(device).eval()

    native = model_context(config, tokenizer)
    context = context_override or native
    if context_override and context_override > native:
        log.warning("%s: context length %d exceeds the model's %d", where, context, native)
    embed_max = min(context, native)
    st_cfg = Path(where) / "sentence_bert_config.json"
    if local and st_cfg.is_file():
        seq_len = json.loads(st_cfg.read_text()).get("max_seq_length")
        if isinstance(seq_len, int) and seq_len > 0:
            embed_max = min(embed_max, seq_len)
    eos: set[int] = set()
    for src in (getattr(model, "generation_config", None), config):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        eos.update([e] if isinstance(e, int) else (e or []))
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    vocab = int(getattr(config.get_text_config(), "vocab_size", 0) or len(tokenizer))
    log.info("loaded %s as %s (%s, %s, context %d)", where, names, task, device, context)
    return ServedModel(
        where,
        names,
        task,
        model,
        tokenizer,
        context,
        embed_max,
        eos_ids=frozenset(eos),
        vocab_size=vocab,
        max_token_chars=max_token_chars(tokenizer),
    )


# Pre-tokenizers that split text without dropping any of it (unless a Split
# or Punctuation says behavior "Removed"), and normalizers that never shorten
# it (NFC and NFKC compose: at most 4 characters into 1).
_KEEPING_PRE = {"ByteLevel", "Metaspace", "Split", "Digits", "Punctuation", "UnicodeScripts"}
_KEEPING_NORM = {"Prepend", "Lowercase", "NFD", "NFKD", "Replace", "NFC", "NFKC"}


def max_token_chars(tokenizer: Any) -> int:
    """Characters of input text that one token stands for, at most, or 0
    where the tokenizer gives no such bound.

    Only BPE tokenizers qualify, and only where every character becomes at
    least one token of at most its vocabulary string's length: byte-level
    (with all 256 byte symbols) or byte-fallback, or one unknown token per
    unknown character; with no normalizer, pre-tokenizer or added token that
    drops or swallows text. Then one token covers at most as many
    characters as the longest string in the vocabulary (times 4 behind a
    composing normalizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return 0
    try:
        spec = json.loads(backend.to_str())
        vocab = tokenizer.get_vocab()
    except Exception:
        return 0
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not vocab:
        return 0
    pre = _parts(spec.get("pre_tokenizer"))
    kinds = {x.get("type") for x in pre}
    if not kinds <= _KEEPING_PRE or any(x.get("behavior") == "Removed" for x in pre):
        return 0
    if not (
        model.get("byte_fallback")
        or (model.get("unk_token") is not None and not model.get("fuse_unk"))
        or ("ByteLevel" in kinds and _byte_symbols() <= vocab.keys())
    ):
        return 0
    factor = 1
    for n in _parts(spec.get("normalizer")):
        kind = n.get("type")
        if kind not in _KEEPING_NORM:
            return 0
        if kind == "Replace":
            old = (n.get("pattern") or {}).get("String")
            if old is None or len(n.get("content") or "") < len(old):
                return 0
        if kind in ("NFC", "NFKC"):
            factor = 4
    if any(a.get("lstrip") or a.get("rstrip") for a in spec.get("added_tokens") or []):
        return 0
    return factor * max(len(t) for t in vocab)


def _parts(spec: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A normalizer's or pre-tokenizer's parts (a Sequence's members)."""
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        members = spec.get("normalizers") or spec.get("pretokenizers") or []
        return [p for m in members for p in _parts(m)]
    return [spec]


def _byte_symbols() -> set[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return set(ByteLevel.alphabet())


def is_causal(model: Any) -> bool:
    return type(model).__name__.endswith(_CAUSAL_SUFFIXES)


def config_is_causal(config: Any) -> bool:
    """A ``*ForCausalLM`` architecture, or (no architectures listed) a model type
    with a causal-LM class and no masked-LM one (so BERT counts as an encoder)."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith(_CAUSAL_SUFFIXES) for a in archs)
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    t = getattr(config, "model_type", "")
    return t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and t not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def model_context(config: Any, tokenizer: Any) -> int:
    text_cfg = config.get_text_config()
    for attr in (
        "max_position_embeddings",
        "n_positions",
        "max_sequence_length",
        "seq_length",
        "n_ctx",
    ):
        v = getattr(text_cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    if isinstance(v, int) and 0 < v < 1_000_000:
        return v
    return DEFAULT_CONTEXT
