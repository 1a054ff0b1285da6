"""The vllm engine the worker tests share: set up here, once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest_asyncio

if TYPE_CHECKING:
    from zserve.worker.engines.vllm import VLLMEngine

VLLM_CONTEXT = 256
# Small and quick on CPU: no torch.compile warm-up, a 64 MiB KV cache.
VLLM_ENGINE_ARGS = {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vllm_engine(tiny_model_dir: Path) -> AsyncIterator[VLLMEngine]:
    """The tiny model on vLLM, served as ``tiny`` and ``tiny-alias`` with a
    context of ``VLLM_CONTEXT``: one engine per test module (~25 s to start),
    on the module's event loop (tests mark ``asyncio(loop_scope="module")``)."""
    from zserve.worker.engines import load_engine
    from zserve.worker.engines.vllm import VLLMEngine
    from zserve.worker.options import EngineOptions

    opts = EngineOptions(
        models=[str(tiny_model_dir)],
        model_names=[["tiny", "tiny-alias"]],
        dtype="float32",
        context_length=VLLM_CONTEXT,
        engine_args=dict(VLLM_ENGINE_ARGS),
    )
    eng = load_engine("vllm", opts)
    assert isinstance(eng, VLLMEngine)
    await eng.start()
    try:
        yield eng
    finally:
        await eng.close()
