"""Engine options as the CLI collects them; each engine takes what it needs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EngineOptions:
    models: list[str]  # --model, repeatable: a path, hub id, or (null) a name
    # --model-names, repeatable, one comma list per --model: the served names.
    model_names: list[list[str]] | None = None
    capacity: int = 1  # --capacity: concurrent requests the worker takes
    token_delay: float = 0.0  # null engine: seconds per token
    device: str = "auto"  # hf: auto|cpu|cuda
    dtype: str = "auto"  # hf/vllm: auto|float32|float16|bfloat16
    context_length: int | None = None  # override the model's own
    model_info_file: str | None = None  # hf-api: JSON served-name -> endpoint info
    # vllm pass-through: --tensor-parallel-size, --gpu-memory-utilization,
    # --max-model-len and any --engine-arg KEY=VALUE (values parsed as JSON
    # where they parse, strings otherwise).
    engine_args: dict[str, Any] = field(default_factory=dict)

    def served_names(self) -> list[list[str]]:
        """The names each --model is served under (default: its basename)."""
        if self.model_names:
            if len(self.model_names) != len(self.models):
                raise ValueError(
                    f"--model-names given {len(self.model_names)} times for "
                    f"{len(self.models)} --model"
                )
            return [list(n) for n in self.model_names]
        return [[os.path.basename(m.rstrip("/")) or m] for m in self.models]
