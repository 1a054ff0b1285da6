"""The tenants file: who a caller is, and what it may use.

A TOML file (``zserve broker --tenants FILE``, ``zserve gateway --tenants
FILE``), read at start and again on SIGHUP, like the CURVE allow lists
(``security.py``, beside it). A tenant is named by what a caller proves, never
by what it claims: an API key it showed the gateway, or the CURVE public key
its connection to the broker authenticated with (the ZAP user id). Callers
that prove nothing a tenant names fall into the tenant ``default``.

::

    [scheduler]
    aging_seconds = 30          # a queued request rises one priority class per this
    reserve_max_tokens = 1024   # reserved for a request that sets no max_tokens
    sync_interval = 0.25        # seconds between usage reports to peer brokers

    [gateways]
    curve_keys = ["gateway.key"]  # gateways trusted to name the tenant of their API key
    trust_unauthenticated = false # without CURVE: any client may name one (loopback only)

    [tenants.default]           # callers with no tenant
    max_inflight = 16

    [tenants.alice]
    api_keys = ["sk-alice-1"]
    curve_keys = ["clients/alice.key"]  # a .key file (relative to this file) or z85 text
    max_inflight = 20
    requests_per_minute = 600
    tokens_per_minute = 200000  # prompt + completion
    priority = 1                # higher classes are served first
    weight = 2                  # fair share within a class

Every limit is optional (absent: none). ``load_tenants`` checks everything
and raises ``ValueError`` naming the field; the broker keeps its previous
table when a reload fails.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zmq.utils import z85

DEFAULT_TENANT = "default"
AGING_SECONDS = 30.0
RESERVE_MAX_TOKENS = 1024
SYNC_INTERVAL = 0.25
SYNC_LIVENESS = 4  # sync intervals of silence after which a peer broker counts as lost
MAX_PRIORITY = 1000  # |priority| at most
# Tenant names are label values in /metrics and keys on the wire: short and plain.
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_LIMITS = ("max_inflight", "requests_per_minute", "tokens_per_minute")
_TENANT_FIELDS = frozenset((*_LIMITS, "priority", "weight", "api_keys", "curve_keys"))


@dataclass(frozen=True)
class TenantSpec:
    """One tenant as the file says it (limits None: no limit)."""

    name: str
    max_inflight: int | None = None
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    priority: int = 0  # higher classes first
    weight: float = 1.0  # share of capacity within its class
    api_keys: frozenset[str] = frozenset()
    curve_keys: frozenset[bytes] = frozenset()  # z85 public keys

    @property
    def limited(self) -> bool:
        return any(getattr(self, k) is not None for k in _LIMITS)


@dataclass(frozen=True)
class TenantTable:
    """The whole file, with the lookups the broker and the gateway make."""

    tenants: dict[str, TenantSpec] = field(default_factory=dict)  # ``default`` included
    trusted_gateways: frozenset[bytes] = frozenset()  # z85 CURVE keys
    trust_unauthenticated: bool = False
    aging_seconds: float = AGING_SECONDS
    reserve_max_tokens: int = RESERVE_MAX_TOKENS
    sync_interval: float = SYNC_INTERVAL
    by_curve_key: dict[bytes, str] = field(default_factory=dict)
    by_api_key: dict[str, str] = field(default_factory=dict)

    @property
    def default(self) -> TenantSpec:
        return self.tenants[DEFAULT_TENANT]

    def for_curve_key(self, key: bytes | None) -> TenantSpec:
        """The tenant of a connection's CURVE key (``default`` if none names it)."""
        name = self.by_curve_key.get(key) if key else None
        return self.tenants[name] if name is not None else self.default

    def for_api_key(self, key: str) -> str | None:
        """The tenant name of an API key, or None."""
        return self.by_api_key.get(key)


def load_tenants(path: str | os.PathLike[str]) -> TenantTable:
    """Read and check a tenants file (``ValueError`` with the file and field)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"tenants file {p}: {e}") from None
    try:
        return parse_tenants(data, p.parent)
    except ValueError as e:
        raise ValueError(f"tenants file {p}: {e}") from None


def parse_tenants(data: dict[str, Any], base: Path | None = None) -> TenantTable:
    """A ``TenantTable`` from the file's TOML, curve key files relative to ``base``."""
    _only(data, {"scheduler", "gateways", "tenants"}, "top level")
    sched = _table(data, "scheduler")
    _only(sched, {"aging_seconds", "reserve_max_tokens", "sync_interval"}, "[scheduler]")
    gws = _table(data, "gateways")
    _only(gws, {"curve_keys", "trust_unauthenticated"}, "[gateways]")
    trust = gws.get("trust_unauthenticated", False)
    if not isinstance(trust, bool):
        raise ValueError("[gateways] trust_unauthenticated must be true or false")
    tenants: dict[str, TenantSpec] = {}
    by_curve: dict[bytes, str] = {}
    by_api: dict[str, str] = {}
    for name, t in _table(data, "tenants").items():
        if not _NAME.fullmatch(name):
            raise ValueError(f"tenant name {name!r}: 1 to 64 of A-Z a-z 0-9 _ . -")
        if not isinstance(t, dict):
            raise ValueError(f"[tenants.{name}] must be a table")
        spec = _tenant(name, t, base)
        for k in spec.curve_keys:
            if k in by_curve:
                raise ValueError(f"a CURVE key of {name!r} also names {by_curve[k]!r}")
            by_curve[k] = name
        for k in spec.api_keys:
            if k in by_api:
                raise ValueError(f"an API key of {name!r} also names {by_api[k]!r}")
            by_api[k] = name
        tenants[name] = spec
    tenants.setdefault(DEFAULT_TENANT, TenantSpec(DEFAULT_TENANT))
    return TenantTable(
        tenants=tenants,
        trusted_gateways=frozenset(_keys(gws.get("curve_keys", []), "[gateways] curve_keys", base)),
        trust_unauthenticated=trust,
        aging_seconds=_positive(sched.get("aging_seconds", AGING_SECONDS), "aging_seconds"),
        reserve_max_tokens=int(
            _positive(sched.get("reserve_max_tokens", RESERVE_MAX_TOKENS), "reserve_max_tokens")
        ),
        sync_interval=_positive(sched.get("sync_interval", SYNC_INTERVAL), "sync_interval"),
        by_curve_key=by_curve,
        by_api_key=by_api,
    )


def _tenant(name: str, t: dict[str, Any], base: Path | None) -> TenantSpec:
    _only(t, _TENANT_FIELDS, f"[tenants.{name}]")
    where = f"tenants.{name}"
    mi = t.get("max_inflight")
    if mi is not None and (isinstance(mi, bool) or not isinstance(mi, int) or mi < 1):
        raise ValueError(f"{where}.max_inflight must be an integer >= 1")
    prio = t.get("priority", 0)
    if isinstance(prio, bool) or not isinstance(prio, int) or abs(prio) > MAX_PRIORITY:
        raise ValueError(
            f"{where}.priority must be an integer in [-{MAX_PRIORITY}, {MAX_PRIORITY}]"
        )
    api = t.get("api_keys", [])
    if not isinstance(api, list) or not all(isinstance(k, str) and k for k in api):
        raise ValueError(f"{where}.api_keys must be a list of non-empty strings")
    rpm, tpm = t.get("requests_per_minute"), t.get("tokens_per_minute")
    return TenantSpec(
        name=name,
        max_inflight=mi,
        requests_per_minute=None if rpm is None else _positive(rpm, f"{where}.requests_per_minute"),
        tokens_per_minute=None if tpm is None else _positive(tpm, f"{where}.tokens_per_minute"),
        priority=prio,
        weight=_positive(t.get("weight", 1.0), f"{where}.weight"),
        api_keys=frozenset(api),
        curve_keys=frozenset(_keys(t.get("curve_keys", []), f"{where}.curve_keys", base)),
    )


def _keys(values: Any, where: str, base: Path | None) -> list[bytes]:
    """z85 public keys: each value a 40-character z85 key or a ``.key`` file."""
    from zserve.security import load_public

    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{where} must be a list of key files or z85 keys")
    out = []
    for v in values:
        if len(v) == 40 and not os.path.exists(_resolve(v, base)):
            try:
                z85.decode(v.encode("ascii"))
            except (ValueError, KeyError, UnicodeEncodeError):
                raise ValueError(f"{where}: {v!r} is neither a key file nor a z85 key") from None
            out.append(v.encode("ascii"))
            continue
        try:
            out.append(load_public(_resolve(v, base)))
        except (OSError, ValueError) as e:
            raise ValueError(f"{where}: {v}: {e}") from None
    return out


def _resolve(v: str, base: Path | None) -> str:
    return str(base / v) if base is not None and not os.path.isabs(v) else v


def _positive(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive number")
    return float(v)


def _table(data: dict[str, Any], key: str) -> dict[str, Any]:
    v = data.get(key, {})
    if not isinstance(v, dict):
        raise ValueError(f"[{key}] must be a table")
    return v


def _only(d: dict[str, Any], allowed: set[str] | frozenset[str], where: str) -> None:
    extra = sorted(set(d) - set(allowed))
    if extra:
        raise ValueError(
            f"{where}: unknown field {extra[0]!r} (known: {', '.join(sorted(allowed))})"
        )
