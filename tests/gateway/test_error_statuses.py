"""Every error code a caller can meet has its HTTP status: only the engine's
own failures and protocol breakage are 500s. A code that fell through to 500
(``client_expired`` did) tells an HTTP caller "server bug" where it should
say "try again"."""

from __future__ import annotations

import zserve.errors as errors
from zserve.gateway.errors import STATUS, to_api_error

SERVER_FAULTS = {"engine_error", "protocol_error", "error"}


def test_every_error_code_has_a_status() -> None:
    classes = [
        c for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.ZServeError)
    ]  # fmt: skip
    codes = {c.code for c in classes} - SERVER_FAULTS
    assert "client_expired" in codes
    missing = sorted(c for c in codes if c not in STATUS)
    assert not missing, f"codes without an HTTP status: {missing}"


def test_client_expired_is_retryable() -> None:
    e = to_api_error(errors.ClientExpired("silent too long"))
    assert e.status == 503
