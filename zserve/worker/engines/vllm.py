"""The ``vllm`` engine: one model on vLLM's asynchronous engine (the seed's VLLMWorker).

vLLM batches continuously inside its own engine-core process; this engine
turns each request into a ``vllm.SamplingParams`` with
``RequestOutputKind.DELTA`` and yields every ``RequestOutput`` as a zserve
``Delta`` the moment it arrives (the worker runtime coalesces them).

Every zserve parameter reaches vLLM, ``repetition_penalty`` and ``logprobs``
included (the seed dropped both). The prompt is tokenized here (a chat
request through the tokenizer's chat template) so that a prompt longer than
the context is a ``ContextOverflow`` before it reaches the engine, and
``max_tokens`` is capped at what the context has left.

Resumption (``GenerateRequest.continue_ids``, ``resumable``): the prompt ids
and the continued ids go to vLLM as one token prompt, and ``max_tokens`` is
what remains. vLLM's detokenizer takes its context from the prompt tokens
(``FastIncrementalDetokenizer`` primes a ``tokenizers`` ``DecodeStream`` with
them), so the text goes on exactly where the earlier attempt's stopped
(tests/worker/test_resume_engines.py checks it on a byte-level BPE), with
one exception: a prompt that ends inside a UTF-8 character makes that stream
start over and emit the whole text once. When the continued ids end inside
a character, this engine therefore detokenizes itself (``hf_detok``, primed
with the continued ids) and leaves stop strings to the worker runtime.
Greedy continuations are exact without presence/frequency penalties
(repetition_penalty counts prompt and output tokens alike, so it is exact
too); vLLM applies presence and frequency penalties to *output* tokens only,
so with either set a continuation forgets the continued ids' counts and is
not the uninterrupted run. A sampled request's random stream restarts from
its seed, and a stop string that begins in the continued text is caught by
the worker runtime (the text is cut right; the final delta may carry a few
ids past it).

An engine-core failure (``EngineDeadError``) fails the request with an
``EngineError`` and sets ``dead``: the worker runtime polls ``engine.dead``
on every heartbeat and leaves, so the broker expires the worker and its
clients' requests go elsewhere.

On CPU, vLLM starts its engine core with ``multiprocessing`` *spawn*: the
process's main module must be import-safe (``if __name__ == "__main__"``),
which console scripts and pytest are. Size the KV cache with the engine
argument ``kv_cache_memory_bytes`` (or vLLM's ``VLLM_CPU_KVCACHE_SPACE``, in
GiB); by default vLLM on CPU claims a large share of the machine's memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from zserve.errors import BadRequest, ContextOverflow, EngineError
from zserve.protocol import FINISH_LENGTH, FINISH_STOP, Delta
from zserve.protocol import SamplingParams as ZSamplingParams
from zserve.worker.engine import Engine, GenerateRequest, render_chat
from zserve.worker.options import EngineOptions

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

    from zserve.worker.engines.hf_detok import IncrementalDetokenizer

log = logging.getLogger(__name__)

# Prompts longer than this many characters are tokenized off the event loop.
_TOKENIZE_INLINE_CHARS = 4096
# Continued ids replayed through a detokenizer off the event loop past this many.
_REPLAY_INLINE_IDS = 256
# Trailing ids decoded to see whether the continued ids end inside a character
# (a UTF-8 character is at most 4 bytes, so at most 4 byte tokens).
_CHAR_IDS = 8


class VLLMEngine(Engine):
    name = "vllm"
    resumable = True
    takes_structured = True  # zserve/worker/grammar.py, through engines/vllm_grammar.py
    prompt_logprobs = True  # vLLM's own (SamplingParams.prompt_logprobs)

    def __init__(
        self,
        model: str,
        served_names: list[str],
        *,
        dtype: str = "auto",
        context_length: int | None = None,
        engine_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.models = list(served_names)
        self.engine_args = _engine_args(model, dtype, context_length, engine_args or {})
        self.llm: AsyncLLM | None = None
        self._tokenizer: Any = None
        self._eos_ids: frozenset[int] = frozenset()  # what vLLM stops on unless ignore_eos
        self._grammars: Any = None  # structured outputs checked here (zserve/worker/grammar.py)
        self._dead = False

    @classmethod
    def from_options(cls, opts: EngineOptions) -> VLLMEngine:
        if len(opts.models) != 1:
            raise ValueError(
                f"the vllm engine serves one model per worker; got {len(opts.models)} --model"
            )
        return cls(
            opts.models[0],
            opts.served_names()[0],
            dtype=opts.dtype,
            context_length=opts.context_length,
            engine_args=opts.engine_args,
        )

    # ------------------------------------------------------------- lifecycle

    def default_capacity(self) -> tuple[int, str]:
        """vLLM's own ``max_num_seqs`` (what ``vllm serve`` schedules at once),
        pinned in the engine arguments so that vLLM runs exactly the number
        the worker advertises."""
        given = self.engine_args.get("max_num_seqs")
        if given:
            return int(given), "the engine argument max_num_seqs"
        n = _server_max_num_seqs(self.engine_args)
        self.engine_args["max_num_seqs"] = n
        return n, "vLLM's default max_num_seqs for a server"

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(**self.engine_args)
        log.info("starting vLLM on %s (%s)", self.model, self.engine_args)
        # The server's defaults (batch sizes), as `vllm serve` gets them.
        self.llm = AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER)
        self._tokenizer = self.llm.get_tokenizer()
        self._eos_ids = _eos_ids(self._tokenizer, self.llm.model_config)
        self.context_length = int(self.llm.model_config.max_model_len)
        seqs = self.llm.vllm_config.scheduler_config.max_num_seqs
        log.info(
            "vLLM ready: %s as %s, context %d, max_num_seqs %d",
            self.model, self.models, self.context_length, seqs,
        )  # fmt: skip

    async def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()

    @property
    def dead(self) -> bool:
        """True once vLLM's engine core has failed; the worker should exit."""
        return self._dead or (self.llm is not None and self.llm.errored)

    # ------------------------------------------------------------- requests

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import tokens_input
        from vllm.v1.engine.exceptions import EngineDeadError

        llm = self._running()
        prompt_ids, prompt_text = await self._prompt_ids(request)
        n_prompt = len(prompt_ids)
        if n_prompt >= self.context_length:
            raise ContextOverflow(
                f"the prompt has {n_prompt} tokens; this model's context is "
                f"{self.context_length} tokens (the prompt and at least one new token)"
            )
        p = request.params
        cont = request.continue_ids
        room = self.context_length - n_prompt - len(cont)
        if room < 0:
            raise ContextOverflow(
                f"the prompt ({n_prompt} tokens) and the {len(cont)} tokens to continue "
                f"after pass this model's context of {self.context_length} tokens"
            )
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self._eos_ids)
        if cont and (room == 0 or cont[-1] in stop_ids):
            # The uninterrupted run ended with the last continued token.
            finish = FINISH_LENGTH if room == 0 else FINISH_STOP
            yield Delta("", [], finish, {"prompt_tokens": n_prompt, "completion_tokens": 0})
            return
        skip = request.skip_special_tokens
        detok = await self._own_detokenizer(prompt_ids, cont, skip)
        extra = await self._structured(p, room, cont)
        params = self._sampling_params(p, room, detok is None, extra, skip)
        top_n = p.logprobs
        scored = None  # the prompt's logprobs, for the first delta
        # A continuation's prompt ids are not the prompt text's alone: no text.
        inputs = tokens_input(prompt_ids + cont, prompt=None if cont else prompt_text)
        gen = llm.generate(inputs, params, request.request_id)
        completion = 0
        first = True
        try:
            async for out in gen:
                if first and out.prompt_logprobs and p.prompt_logprobs is not None:
                    scored = _prompt_logprobs(prompt_ids, out.prompt_logprobs, p.prompt_logprobs,
                                              self._tokenizer)  # fmt: skip
                    if p.max_tokens == 0:  # scored; the one token vLLM made is dropped
                        usage0 = {"prompt_tokens": n_prompt, "completion_tokens": 0}
                        yield Delta("", [], FINISH_LENGTH, usage0, prompt_logprobs=scored)
                        return
                c = out.outputs[0]
                ids = list(c.token_ids)
                completion += len(ids)
                finish = c.finish_reason
                if finish in ("abort", "error"):
                    raise EngineError(f"vLLM ended the request: {finish}")
                text = c.text
                if detok is not None:
                    # As vLLM does: the text of the token that stopped the
                    # request (EOS, a stop token id) is not sent, and a
                    # partial character left at the end is dropped (no flush).
                    said = ids[:-1] if finish == "stop" else ids
                    text = "".join([detok.push([t]) for t in said])
                if finish is not None:
                    finish = FINISH_LENGTH if finish == "length" else FINISH_STOP
                    usage: dict[str, int] | None = {
                        "prompt_tokens": n_prompt,
                        "completion_tokens": completion,
                    }
                    # vLLM's prefix cache: prompt tokens it did not prefill.
                    cached = getattr(out, "num_cached_tokens", None)
                    if cached:
                        usage["cached_tokens"] = int(cached)
                elif first:
                    usage = {"prompt_tokens": n_prompt}
                else:
                    usage = None
                if not ids and not text and finish is None:
                    continue
                logprobs = (
                    _openai_logprobs(ids, c.logprobs, top_n, self._tokenizer)
                    if top_n is not None
                    else None
                )
                first = False
                yield Delta(text, ids, finish, usage, logprobs, prompt_logprobs=scored)
                scored = None
                if finish is not None:
                    return
        except EngineDeadError as e:
            self._dead = True
            log.error("vLLM engine core died: %s", e)
            raise EngineError(f"the vLLM engine died: {e}") from e
        except (VLLMClientError, ValueError) as e:
            raise BadRequest(str(e)) from e
        finally:
            # Closing vLLM's generator early aborts the request in the engine.
            await gen.aclose()

    async def abort(self, request_id: str) -> None:
        if self.llm is not None and not self.dead:
            await self.llm.abort(request_id)

    def tokenizer(self, model: str) -> Any:
        return self._tokenizer

    async def tokenize(
        self,
        request: GenerateRequest,
        add_special_tokens: bool | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        self._running()
        tok = self._tokenizer
        if request.messages is not None:
            text = render_chat(tok, request.messages, request.tools, add_generation_prompt)
            special = bool(add_special_tokens)  # the template writes its own
        else:
            text = request.prompt or ""
            special = add_special_tokens is not False
        if len(text) > _TOKENIZE_INLINE_CHARS:
            return list(await asyncio.to_thread(tok.encode, text, add_special_tokens=special))
        return list(tok.encode(text, add_special_tokens=special))

    async def detokenize(self, model: str, ids: list[int]) -> str:
        self._running()
        return str(self._tokenizer.decode(ids))

    async def count_tokens(self, model: str, text: str) -> int:
        self._running()
        return len(self._tokenizer.encode(text))

    async def decode(self, model: str, ids: list[int]) -> str:
        self._running()
        return str(self._tokenizer.decode(ids, skip_special_tokens=True)).rstrip("\ufffd")

    async def continued_text(self, request: GenerateRequest) -> str:
        """The continued ids' text as the stream decoded it: vLLM's
        detokenizer takes the prompt as context (a SentencePiece tokenizer
        keeps a first word's leading space), and so does this replay
        (``hf_detok``, as ``_own_detokenizer``), off the event loop. A last id
        that stopped the request (EOS, a stop token id) gave no text."""
        from zserve.worker.engines.hf_detok import IncrementalDetokenizer

        self._running()
        prompt_ids, _ = await self._prompt_ids(request)
        p = request.params
        cont = list(request.continue_ids)
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self._eos_ids)
        if cont and cont[-1] in stop_ids:
            cont.pop()
        detok = await asyncio.to_thread(
            IncrementalDetokenizer, self._tokenizer, prompt_ids, request.skip_special_tokens, cont
        )
        return detok.replayed

    # ------------------------------------------------------------- helpers

    def _running(self) -> AsyncLLM:
        if self.llm is None:
            raise EngineError("the vLLM engine is not running")
        if self.dead:
            self._dead = True
            raise EngineError("the vLLM engine died")
        return self.llm

    async def _prompt_ids(self, request: GenerateRequest) -> tuple[list[int], str | None]:
        """Token ids of the prompt (a chat goes through the chat template) and its text."""
        tok = self._tokenizer
        if request.prompt_ids is not None:  # as given: vLLM checks them against its vocabulary
            return list(request.prompt_ids), None
        if request.messages is not None:
            text = render_chat(tok, request.messages, request.tools)
            special = False  # the template writes its own special tokens
        else:
            text = request.prompt or ""
            special = True
        if len(text) > _TOKENIZE_INLINE_CHARS:
            ids = await asyncio.to_thread(tok.encode, text, add_special_tokens=special)
        else:
            ids = tok.encode(text, add_special_tokens=special)
        if not ids:
            raise BadRequest("the prompt is empty")
        return list(ids), text

    async def _own_detokenizer(
        self, prompt_ids: list[int], cont: list[int], skip_special: bool = True
    ) -> IncrementalDetokenizer | None:
        """For continued ids that end inside a UTF-8 character (vLLM's own
        detokenizer would restart there), a detokenizer primed with them;
        None when vLLM's detokenizer continues right."""
        from zserve.worker.engines.hf_detok import REPLACEMENT, IncrementalDetokenizer

        if not cont:
            return None
        tail = self._tokenizer.decode((prompt_ids + cont)[-_CHAR_IDS:], skip_special_tokens=True)
        if not tail.endswith(REPLACEMENT):
            return None
        if len(cont) <= _REPLAY_INLINE_IDS:
            return IncrementalDetokenizer(self._tokenizer, prompt_ids, skip_special, cont)
        return await asyncio.to_thread(
            IncrementalDetokenizer, self._tokenizer, prompt_ids, skip_special, cont
        )

    async def _structured(
        self, p: ZSamplingParams, room: int, cont: list[int]
    ) -> dict[str, Any] | None:
        """A structured request's ``extra_args`` for the grammar logits
        processor (``vllm_grammar``), checked here first: the spec compiles
        and the continued ids follow it, else ``BadRequest`` (the processor
        runs in the engine core, where it must not fail)."""
        spec = p.structured
        if spec is None:
            return None
        from zserve.worker.engines.vllm_grammar import FQCN, engine_extra

        if FQCN not in (self.engine_args.get("logits_processors") or ()):
            raise BadRequest(
                "structured outputs need zserve's logits processor, which vLLM refuses "
                "beside speculative decoding"
            )
        if self._grammars is None:
            self._grammars = await asyncio.to_thread(_new_grammars, self._tokenizer, self)
        from zserve.worker.grammar import argmax_only

        g = self._grammars
        max_tokens = room if p.max_tokens is None else min(p.max_tokens, room)
        greedy = argmax_only(p)
        try:
            row = g.row(spec, max_tokens, greedy) if g.cached(spec) else await asyncio.to_thread(
                g.row, spec, max_tokens, greedy
            )
        except ValueError as e:
            raise BadRequest(str(e)) from e
        if cont and not row.replay(cont):
            raise BadRequest("continue_ids do not follow the grammar of structured")
        return engine_extra(spec, len(cont), greedy)

    def _sampling_params(
        self,
        p: ZSamplingParams,
        room: int,
        detokenize: bool = True,
        extra_args: dict[str, Any] | None = None,
        skip_special_tokens: bool = True,
    ) -> Any:
        """vLLM's parameters; ``detokenize=False`` when this engine makes the
        text itself (stop strings are then the worker runtime's alone). A
        structured request (``extra_args``) ends when its grammar takes EOS,
        ``ignore_eos`` or not, as on the hf engine. ``skip_special_tokens``
        False keeps them in the text (vLLM leaves out the stopping token's)."""
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        max_tokens = room if p.max_tokens is None else min(p.max_tokens, room)
        try:
            return SamplingParams(
                n=1,
                temperature=p.temperature,
                top_p=p.top_p,
                top_k=p.top_k if p.top_k > 0 else 0,  # 0: disabled
                repetition_penalty=p.repetition_penalty,
                presence_penalty=p.presence_penalty,
                frequency_penalty=p.frequency_penalty,
                seed=p.seed,
                stop=(list(p.stop) or None) if detokenize else None,
                detokenize=detokenize,
                skip_special_tokens=skip_special_tokens,
                stop_token_ids=list(p.stop_token_ids) or None,
                ignore_eos=p.ignore_eos and extra_args is None,
                max_tokens=max(1, max_tokens),  # 0 (score the prompt): one, dropped
                logprobs=p.logprobs,
                prompt_logprobs=p.prompt_logprobs,
                output_kind=RequestOutputKind.DELTA,
                extra_args=extra_args,
            )
        except (VLLMClientError, ValueError, TypeError) as e:
            raise BadRequest(str(e)) from e


def _engine_args(
    model: str, dtype: str, context_length: int | None, extra: dict[str, Any]
) -> dict[str, Any]:
    """The AsyncEngineArgs keywords; unknown keys are a ValueError that names them."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(
            f"unknown vLLM engine argument(s): {', '.join(unknown)} "
            "(see vllm.engine.arg_utils.AsyncEngineArgs)"
        )
    args: dict[str, Any] = {"model": model, "dtype": dtype, "disable_log_stats": True}
    if context_length:
        args["max_model_len"] = context_length
    args.update(extra)  # explicit engine arguments win
    if not args.get("speculative_config"):  # vLLM refuses logits processors beside it
        from zserve.worker.engines.vllm_grammar import FQCN

        args["logits_processors"] = [*(args.get("logits_processors") or ()), FQCN]
    return args


def _new_grammars(tokenizer: Any, engine: VLLMEngine) -> Any:
    from zserve.worker.grammar import Grammars

    assert engine.llm is not None
    return Grammars(tokenizer, engine.llm.model_config.get_vocab_size(), engine._eos_ids)


def _eos_ids(tokenizer: Any, model_config: Any) -> frozenset[int]:
    """The ids vLLM ends a request on unless ``ignore_eos``: the tokenizer's
    EOS and the generation config's ``eos_token_id`` (an int or a list)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        extra = model_config.try_get_generation_config().get("eos_token_id")
    except Exception as e:  # another vLLM version
        log.warning("no generation config eos ids (%s)", e)
        extra = None
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, list):
        ids.update(int(t) for t in extra)
    return frozenset(ids)


def _server_max_num_seqs(args: dict[str, Any]) -> int:
    """The ``max_num_seqs`` vLLM picks for a server (``UsageContext.OPENAI_API_SERVER``)
    on this platform when none is given: 128 per rank on CPU, up to 1024 on
    large GPUs."""
    from vllm.config.scheduler import SchedulerConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    tp, pp = (int(args.get(k) or 1) for k in ("tensor_parallel_size", "pipeline_parallel_size"))
    world = tp * pp
    n = SchedulerConfig.DEFAULT_MAX_NUM_SEQS
    try:
        n = EngineArgs.get_batch_defaults(world)[1].get(UsageContext.OPENAI_API_SERVER, n)
    except Exception as e:  # another vLLM version, a platform it cannot query
        log.warning("vLLM's batch defaults unavailable (%s); max_num_seqs %d", e, n)
    if args.get("performance_mode") == "throughput":
        n *= 2  # as vLLM does for its own default
    if args.get("max_num_batched_tokens"):
        n = min(n, int(args["max_num_batched_tokens"]))
    return int(n)


def _openai_logprobs(
    ids: list[int], entries: Any, top_n: int, tokenizer: Any
) -> list[dict[str, Any]]:
    """vLLM's per-token {id: Logprob} maps as OpenAI's logprobs content entries."""
    result: list[dict[str, Any]] = []
    for i, tid in enumerate(ids):
        d = entries[i] if entries is not None and i < len(entries) else {}
        chosen = d.get(tid)
        top = sorted(
            ((lp.rank or 0, t, lp) for t, lp in d.items() if (lp.rank or 0) <= top_n),
            key=lambda x: x[0],
        )
        result.append(
            {
                "token": _token_text(tid, chosen, tokenizer),
                "logprob": float(chosen.logprob) if chosen is not None else float("-inf"),
                "top_logprobs": [
                    {"token": _token_text(t, lp, tokenizer), "logprob": float(lp.logprob)}
                    for _, t, lp in top[:top_n]
                ],
            }
        )
    return result


def _prompt_logprobs(
    ids: list[int], entries: Any, top_n: int, tokenizer: Any
) -> list[dict[str, Any]]:
    """vLLM's prompt logprobs (None for the first token) as logprobs entries."""
    first = {"token": str(tokenizer.decode([ids[0]])), "logprob": None, "top_logprobs": None}
    return [first, *_openai_logprobs(ids[1:], list(entries)[1:], top_n, tokenizer)]


def _token_text(tid: int, lp: Any, tokenizer: Any) -> str:
    if lp is not None and lp.decoded_token is not None:
        return str(lp.decoded_token)
    return str(tokenizer.decode([tid]))
