"""A null model worker for FastChat 0.2.36: instant tokens, FastChat's own HTTP layer.

Runs under the FastChat venv (``bench/.venv-fastchat``), not zserve's. It
subclasses FastChat's ``BaseModelWorker`` and serves FastChat's own worker
``app`` (``fastchat.serve.base_model_worker``), so the HTTP endpoints, the
concurrency semaphore, registration and the heartbeat thread are FastChat's
code; only the model is replaced, the way ``fastchat.serve.model_worker``
plugs in a Hugging Face model:

* ``/worker_generate_stream`` streams NUL-separated JSON chunks
  ``{"text": <cumulative text>, "error_code": 0, "usage": ..., "finish_reason": ...}``
  from a synchronous generator (as ``ModelWorker.generate_stream_gate`` does,
  so Starlette iterates it in its thread pool), one chunk every
  ``--stream-interval`` tokens (default 2, ``model_worker``'s default) and at
  the last token, then a final chunk with the same text and
  ``finish_reason``, as ``fastchat.serve.inference.generate_stream`` does.
* ``/worker_generate`` (non-streaming) returns the last chunk.
* Token i is ``"t{i} "``, as zserve's null engine makes it; the "tokenizer"
  counts whitespace-separated words.
* The conversation template is ``one_shot``, what FastChat picks for a model
  path it does not recognise (without importing torch, which
  ``fastchat.model.model_adapter`` would).
* ``--limit-worker-concurrency`` defaults to 1024 (FastChat's vLLM worker
  default; its HF worker's 5 would make the semaphore the bottleneck).

Usage: ``python fastchat_null_worker.py --port P --controller-address URL``.
"""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import uvicorn
from fastchat.conversation import Conversation, get_conv_template
from fastchat.serve import base_model_worker
from fastchat.serve.base_model_worker import BaseModelWorker, app


class WhitespaceTokenizer:
    """What ``BaseModelWorker.count_token`` calls: ``tokenizer(prompt).input_ids``."""

    def __call__(self, text: str) -> SimpleNamespace:
        return SimpleNamespace(input_ids=text.split())


class NullModelWorker(BaseModelWorker):
    def __init__(
        self,
        controller_addr: str,
        worker_addr: str,
        model_names: list[str],
        limit_worker_concurrency: int,
        conv_template: str,
        context_len: int,
        stream_interval: int,
    ) -> None:
        super().__init__(
            controller_addr,
            worker_addr,
            uuid.uuid4().hex[:8],
            model_path="null",
            model_names=model_names,
            limit_worker_concurrency=limit_worker_concurrency,
            conv_template=conv_template,
        )
        self.tokenizer = WhitespaceTokenizer()
        self.context_len = context_len
        self.stream_interval = max(1, stream_interval)
        self.init_heart_beat()

    def make_conv_template(
        self, conv_template: str | None = None, model_path: str | None = None
    ) -> Conversation:
        return get_conv_template(conv_template or "one_shot")

    def generate_stream_gate(self, params: dict[str, Any]) -> Iterator[bytes]:
        self.call_ct += 1
        prompt_tokens = len(str(params.get("prompt", "")).split())
        n = int(params.get("max_new_tokens", 256))
        text = ""
        for i in range(n):
            text += f"t{i} "
            if i % self.stream_interval == 0 or i == n - 1:
                yield self._chunk(text, prompt_tokens, i + 1, None)
        yield self._chunk(text, prompt_tokens, n, "length")

    def generate_gate(self, params: dict[str, Any]) -> dict[str, Any]:
        *_, last = self.generate_stream_gate(params)
        return json.loads(last[:-1].decode())

    @staticmethod
    def _chunk(text: str, prompt_tokens: int, completion_tokens: int, finish: str | None) -> bytes:
        ret = {
            "text": text,
            "error_code": 0,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "finish_reason": finish,
        }
        return json.dumps(ret).encode() + b"\0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--controller-address", required=True)
    parser.add_argument("--worker-address", default=None)
    parser.add_argument("--model-names", default="null", help="comma-separated")
    parser.add_argument("--limit-worker-concurrency", type=int, default=1024)
    parser.add_argument("--conv-template", default="one_shot")
    parser.add_argument("--context-len", type=int, default=4096)
    parser.add_argument("--stream-interval", type=int, default=2)
    args = parser.parse_args()

    worker = NullModelWorker(
        args.controller_address,
        args.worker_address or f"http://{args.host}:{args.port}",
        args.model_names.split(","),
        args.limit_worker_concurrency,
        args.conv_template,
        args.context_len,
        args.stream_interval,
    )
    assert base_model_worker.worker is worker  # the module-level app serves this one
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
