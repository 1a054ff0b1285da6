"""The OpenAI wire format as the hf-api engine reads and writes it, and its errors."""

from __future__ import annotations

import json
from typing import Any

from zserve.errors import BadRequest, ContextOverflow, EngineError, Overloaded, ZServeError
from zserve.protocol import SamplingParams


def http_timeout(connect: float, read: float) -> Any:
    """An httpx2.Timeout: a short connect limit, a long one for silence while reading."""
    import httpx2

    return httpx2.Timeout(read, connect=connect)


def extra_body(p: SamplingParams, configured: dict[str, Any]) -> dict[str, Any]:
    """Non-OpenAI sampling fields (vLLM and TGI read them), only when they matter."""
    extra: dict[str, Any] = {}
    if p.top_k > 0:
        extra["top_k"] = p.top_k
    if p.repetition_penalty != 1.0:
        extra["repetition_penalty"] = p.repetition_penalty
    if p.ignore_eos:
        extra["ignore_eos"] = True
    if p.stop_token_ids:
        extra["stop_token_ids"] = list(p.stop_token_ids)
    extra.update(configured)
    return extra


def usage_of(u: Any) -> dict[str, int] | None:
    if u is None:
        return None
    get = u.get if isinstance(u, dict) else lambda k: getattr(u, k, None)
    prompt, completion = get("prompt_tokens"), get("completion_tokens")
    if prompt is None or completion is None:
        return None
    return {"prompt_tokens": int(prompt), "completion_tokens": int(completion)}


def chat_logprob(e: Any) -> dict[str, Any]:
    return {
        "token": e.token,
        "logprob": float(e.logprob),
        "top_logprobs": [
            {"token": t.token, "logprob": float(t.logprob)} for t in e.top_logprobs or []
        ],
    }


def completion_logprobs(lp: Any, top_n: int | None) -> list[dict[str, Any]] | None:
    """The completions API's column-wise logprobs as OpenAI chat-style entries."""
    if not lp or top_n is None:
        return None
    tokens = lp.get("tokens") or []
    values = lp.get("token_logprobs") or []
    tops = lp.get("top_logprobs") or []
    result = []
    for i, token in enumerate(tokens):
        top = tops[i] if i < len(tops) and tops[i] else {}
        ranked = sorted(top.items(), key=lambda kv: kv[1], reverse=True)[:top_n]
        value = values[i] if i < len(values) else None
        result.append(
            {
                "token": token,
                "logprob": float(value) if value is not None else float("-inf"),
                "top_logprobs": [{"token": t, "logprob": float(v)} for t, v in ranked],
            }
        )
    return result


def sse_data(line: str) -> str | None:
    line = line.strip()
    if not line.startswith("data:"):
        return None
    return line[5:].strip()


def _remote_message(response: Any) -> str:
    """The remote's own error message from an OpenAI-, vLLM- or TGI-style body."""
    try:
        body = response.json()
    except Exception:
        try:
            return str(response.text).strip()[:2000] or response.reason_phrase
        except Exception:
            return str(getattr(response, "reason_phrase", "")) or "no message"
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or err.get("error")
            if msg:
                return str(msg)
        elif err:
            return str(err)
        if body.get("message") or body.get("detail"):
            return str(body.get("message") or body.get("detail"))
    return json.dumps(body)[:2000]


def _client_error(status: int, message: str) -> ZServeError:
    if status == 429:
        return Overloaded(f"remote rate limit (429): {message}")
    low = message.lower()
    if "context length" in low or "context window" in low:
        return ContextOverflow(message)
    return BadRequest(f"remote {status}: {message}")


def stream_error(api_base: str, err: Any) -> ZServeError:
    if isinstance(err, dict):
        message = str(err.get("message") or err)
        code = err.get("code")
        if isinstance(code, int) and 400 <= code < 500:
            return _client_error(code, message)
    else:
        message = str(err)
    return EngineError(f"{api_base}: {message}")


def map_error(api_base: str, e: Exception) -> ZServeError:
    """Any failure of a remote call as a zserve error the client understands."""
    import httpx2
    from huggingface_hub.errors import (
        HfHubHTTPError,
        InferenceTimeoutError,
        OverloadedError,
        TextGenerationError,
        ValidationError,
    )

    if isinstance(e, HfHubHTTPError) and e.response is not None:
        status = e.response.status_code
        message = _remote_message(e.response)
        if 400 <= status < 500:
            return _client_error(status, message)
        return EngineError(f"{api_base} answered {status}: {message}")
    if isinstance(e, (httpx2.ConnectError, httpx2.ConnectTimeout)):
        return EngineError(f"cannot reach {api_base}: {e or type(e).__name__}")
    if isinstance(e, (httpx2.TimeoutException, InferenceTimeoutError)):
        return EngineError(f"{api_base} timed out: {e or type(e).__name__}")
    if isinstance(e, httpx2.TransportError):
        return EngineError(f"connection to {api_base} failed: {type(e).__name__}: {e}")
    if isinstance(e, TextGenerationError) and e.args and isinstance(e.args[0], dict):
        return stream_error(api_base, e.args[0])  # an OpenAI-style error inside the stream
    if isinstance(e, ValidationError):
        return BadRequest(str(e))
    if isinstance(e, OverloadedError):
        return Overloaded(str(e))
    if isinstance(e, TextGenerationError):
        return EngineError(f"{api_base}: {e}")
    if isinstance(e, json.JSONDecodeError):
        return EngineError(f"{api_base} sent a malformed stream: {e}")
    return EngineError(f"{api_base}: {type(e).__name__}: {e}")
