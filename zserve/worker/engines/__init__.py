"""Engines, one module each. ``load_engine`` imports only the one asked for.

Each engine class has ``from_options(opts: EngineOptions) -> Engine``.
"""

from __future__ import annotations

import importlib

from zserve.worker.engine import Engine
from zserve.worker.options import EngineOptions

ENGINES = {
    "null": "zserve.worker.engines.null:NullEngine",
    "hf": "zserve.worker.engines.hf:HFEngine",
    "vllm": "zserve.worker.engines.vllm:VLLMEngine",
    "hf-api": "zserve.worker.engines.hf_api:HFApiEngine",
}


def load_engine(name: str, options: EngineOptions) -> Engine:
    try:
        target = ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls).from_options(options)
