"""Where the gateway's API keys come from: ``--api-keys`` (or the
``ZSERVE_API_KEYS`` environment variable, comma-separated) and
``--api-keys-file`` (one key a line; blank lines and ``#`` comments
skipped). A file or the environment keeps the keys out of ``ps``."""

from __future__ import annotations

from pathlib import Path

ENV = "ZSERVE_API_KEYS"


def split_keys(value: str | None) -> list[str]:
    """Keys from a comma-separated list."""
    return [k.strip() for k in (value or "").split(",") if k.strip()]


def read_key_file(path: str) -> list[str]:
    """The keys in ``path``; ``ValueError`` if it holds none (an empty file
    must not leave the gateway open), ``OSError`` if it cannot be read."""
    keys = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line)
    if not keys:
        raise ValueError(f"no API keys in {path}")
    return keys


def api_keys(listed: str | None, key_file: str | None) -> list[str]:
    """Every key given, each once, in order."""
    keys = split_keys(listed)
    if key_file is not None:
        keys += read_key_file(key_file)
    return list(dict.fromkeys(keys))
