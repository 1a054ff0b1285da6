"""Reference outputs from plain transformers, for comparing engines against."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_reference(model_dir: Path) -> tuple[Any, Any]:
    """(model, tokenizer) of ``model_dir`` through plain transformers, float32, eval mode."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, dtype=torch.float32
    )
    return model.eval(), tok


def greedy_ref(ref: tuple[Any, Any], ids: list[int], n: int, ignore_eos: bool = False) -> list[int]:
    """transformers' greedy ``generate``: up to ``n`` tokens, exactly ``n`` with ignore_eos."""
    import torch

    model, tok = ref
    x = torch.tensor([ids])
    extra = {"min_new_tokens": n, "pad_token_id": tok.eos_token_id} if ignore_eos else {}
    with torch.inference_mode():
        out = model.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n, **extra
        )
    return out[0, len(ids) :].tolist()


def prompt_ids(ref: tuple[Any, Any], prompt: str) -> list[int]:
    return ref[1](prompt)["input_ids"]
