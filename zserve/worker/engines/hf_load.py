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
    )


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
