"""zserve's tiny model: deterministic, and loadable by transformers."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

from zserve.tiny_model import write_tiny_model

FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def test_same_seed_same_files(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = write_tiny_model(str(tmp_path / "again"), seed=0)  # str or Path
    assert isinstance(again, Path)
    for name in FILES:
        assert filecmp.cmp(again / name, tiny_model_dir / name, shallow=False), name


def test_other_seed_other_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    other = write_tiny_model(tmp_path / "other", seed=1)
    assert not filecmp.cmp(
        other / "model.safetensors", tiny_model_dir / "model.safetensors", shallow=False
    )
    assert filecmp.cmp(other / "tokenizer.json", tiny_model_dir / "tokenizer.json", shallow=False)


def test_architecture(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_model_dir, local_files_only=True)
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (128, 2, 2)
    assert cfg.num_key_value_heads == 2
    assert cfg.hidden_size // cfg.num_attention_heads == 64  # vLLM's CPU attention needs 64
    assert cfg.max_position_embeddings == 2048
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert str(model.dtype) == "torch.float32"
    assert model.get_output_embeddings().weight.shape[0] == cfg.vocab_size
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg.eos_token_id


def test_tokenizer(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    assert 1000 <= len(tok) <= 2048
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    text = "The baker's café opened at 09:30 — 日本 🙂"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert len(ids) < len(text.encode())  # BPE merges learned something
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_chat_template(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHello</s>\n<|assistant|>\n"


def test_generates(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    x = tok("Once upon a time", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**x, do_sample=False, max_new_tokens=8)
    assert out.shape[1] == x["input_ids"].shape[1] + 8


def test_unknown_size(tmp_path: Path) -> None:
    import pytest

    with pytest.raises(ValueError, match="size"):
        write_tiny_model(tmp_path / "x", size="huge")
