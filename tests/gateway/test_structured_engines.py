"""An engine that cannot constrain decoding refuses a structured request
instead of answering unconstrained: the null engine (and hf-api) would
otherwise return plain text for ``response_format`` and no calls for
``tool_choice`` required or named, a reply that looks fine and is wrong."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.gateway.conftest import GatewayStack

USER = [{"role": "user", "content": "hello"}]
TOOL = {
    "type": "function",
    "function": {"name": "f", "parameters": {"type": "object", "properties": {}}},
}


@pytest.mark.parametrize(
    "extra",
    [
        {"response_format": {"type": "json_object"}},
        {"guided_regex": "[ab]+"},
        {"tools": [TOOL], "tool_choice": "required"},
        {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}},
    ],
)
def test_null_engine_refuses_structured_requests(gw: GatewayStack, extra: dict[str, Any]) -> None:
    body = {"model": "m", "messages": USER, "max_tokens": 8, **extra}
    r = httpx.post(gw.base_url + "/chat/completions", json=body, headers=gw.headers, timeout=30)
    assert r.status_code == 400, r.text
    assert "cannot constrain decoding" in r.json()["error"]["message"]
    # the same request without the constraint is served
    plain = {k: v for k, v in body.items() if k in ("model", "messages", "max_tokens")}
    r = httpx.post(gw.base_url + "/chat/completions", json=plain, headers=gw.headers, timeout=30)
    assert r.status_code == 200, r.text
