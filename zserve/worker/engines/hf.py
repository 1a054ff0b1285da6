"""The ``hf`` engine: transformers models with continuous batching (the seed's ModelWorker).

One worker may serve several models (``--model`` repeated, ``--model-names``
for their served names, like FastChat's multi_model_worker); requests are
routed by ``request.model``.

* **Causal LMs** generate. ``request.messages`` go through the tokenizer's
  chat template, ``request.prompt`` is tokenized as is. Concurrent requests
  are batched by one background thread per model (``hf_batch``): new
  requests join at step boundaries, finished and aborted ones leave.
  Deltas carry whole UTF-8 characters only (``hf_detok``) and the token ids
  produced with them. Greedy output (temperature 0) equals transformers'
  ``generate(do_sample=False)``.
* **Encoder models** (BERT, MiniLM...: no ``*ForCausalLM`` architecture) serve
  embeddings only: mean pooling over the attention mask, L2-normalised (the
  sentence-transformers recipe FastChat uses). A causal LM also embeds, the
  same way over its last hidden state.

Limits, chosen and documented here:

* A prompt of ``context_length`` tokens or more raises ``ContextOverflow``;
  so does, before it is tokenized, one longer in characters than
  ``context_length`` x the most characters one token stands for, where the
  tokenizer bounds that (``hf_load.max_token_chars``: byte-level and
  byte-fallback BPEs). Prompts past 4096 characters are rendered and
  tokenized in a thread, so that the event loop (heartbeats) never waits on
  them.
* ``max_tokens`` is clamped so that prompt + output fits the context; a
  request that fills the context ends with finish reason ``"length"``.
  ``max_tokens=None`` means "until EOS or the context is full".
* Embedding inputs longer than the model's maximum length are truncated to
  it (``max_seq_length`` of ``sentence_bert_config.json`` when present, as
  sentence-transformers does, else the model's context length).
* The text of the token that ends a request (EOS or a ``stop_token_ids``
  token) is not sent; its id is, and it counts as a completion token. Other
  special tokens are left out of the text unless the request keeps them
  (``GenerateRequest.skip_special_tokens``: a tool-call parser reads them).
* Logprobs are the model's raw distribution (before penalties/temperature).

Resumption (``GenerateRequest.continue_ids``, ``resumable``): the continued
ids are prefilled with the prompt, count as output for every penalty
(repetition over prompt and output, presence/frequency over output, as in an
uninterrupted run) and prime the detokenizer token by token, so greedy
decoding continues with the ids and the text an uninterrupted run would have
produced (up to floating-point summation order: the continued ids are
prefilled in one pass where the uninterrupted run decoded them one by one).
They count against the context; ``max_tokens`` is what remains, and usage
counts only the new tokens. The text of the continued ids that the
caller had not received (past ``continue_chars``: held back by a stop
string) is rebuilt by that same replay, with the prompt's context (a
SentencePiece tokenizer drops a leading space without it), and goes out
first, through the stop matcher, as the uninterrupted run would have sent
it. Not reproduced: a sampled (temperature > 0) request's random stream
restarts from its seed.

Engine arguments (``--engine-arg K=V``): ``max_batch_size`` (default 256),
``prefill_budget`` (prompt tokens admitted per step, default 4096),
``batch_prefill`` (default true: the prompts that join at one step are
prefilled in one padded forward pass; false prefills them one at a time),
``embed_batch_size`` (default 32), ``task`` (``generate`` | ``embed``: force
how every model is used), ``threads`` (torch's intra-op threads for this
worker; default torch's own, one per core. On a small machine shared with the
broker and clients, fewer threads leave cores for them: torch's idle threads
spin and starve other processes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from zserve.errors import BadRequest, ContextOverflow, EngineError, ModelNotFound
from zserve.protocol import FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, Delta, SamplingParams
from zserve.worker.engine import Engine, GenerateRequest, plain_message, render_chat
from zserve.worker.engines.hf_detok import IncrementalDetokenizer
from zserve.worker.engines.hf_load import ServedModel, is_causal, load_model, resolve_model_path
from zserve.worker.options import EngineOptions
from zserve.worker.stops import StopMatcher

log = logging.getLogger(__name__)

ABORT_WAIT = 30.0  # seconds abort() waits for the batch thread to drop a row
# Continued ids replayed through the detokenizer off the event loop past this many.
_REPLAY_INLINE_IDS = 256
# Prompts (or messages) longer than this, in characters, are rendered and
# tokenized off the event loop: heartbeats never wait on a big prompt.
_TOKENIZE_INLINE_CHARS = 4096


class HFEngine(Engine):
    name = "hf"
    resumable = True
    replays_held_text = True
    takes_structured = True  # zserve/worker/grammar.py masks its rows
    prompt_logprobs = True  # from a prefill of their own (_score_prompt)

    def __init__(
        self,
        models: list[tuple[str, list[str]]],
        device: str = "auto",
        dtype: str = "auto",
        context_length: int | None = None,
        engine_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not models:
            raise ValueError("the hf engine needs at least one --model")
        self._specs: list[tuple[str, bool, list[str]]] = []
        for path, names in models:
            where, local = resolve_model_path(path)
            self._specs.append((where, local, names))
        self.models = [n for _, names in models for n in names]
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"served model names must be unique: {self.models}")
        self.device_option = device
        self.dtype_option = dtype
        self.context_override = context_length
        args = dict(engine_args or {})
        self.max_batch_size = int(args.pop("max_batch_size", 256))
        self.prefill_budget = int(args.pop("prefill_budget", 4096))
        self.batch_prefill = _flag(args.pop("batch_prefill", True))
        self.embed_batch_size = int(args.pop("embed_batch_size", 32))
        self.task = args.pop("task", None)
        self.threads = int(args.pop("threads", 0)) or None
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, not {self.threads}")
        if self.task not in (None, "generate", "embed"):
            raise ValueError(f"task must be generate or embed, not {self.task!r}")
        if args:
            raise ValueError(f"unknown hf engine arguments: {', '.join(sorted(args))}")
        self._served: dict[str, ServedModel] = {}
        # request id -> (its Sequence, the model running it), until it leaves the batch
        self._seqs: dict[str, tuple[Any, ServedModel]] = {}
        # id(ServedModel) -> its structured-output grammars (zserve/worker/grammar.py)
        self._grammars: dict[int, Any] = {}

    def default_capacity(self) -> tuple[int, str]:
        n = len(self._specs)
        return self.max_batch_size * n, f"max_batch_size {self.max_batch_size} x {n} model(s)"

    @classmethod
    def from_options(cls, opts: EngineOptions) -> HFEngine:
        return cls(
            list(zip(opts.models, opts.served_names(), strict=True)),
            device=opts.device,
            dtype=opts.dtype,
            context_length=opts.context_length,
            engine_args=opts.engine_args,
        )

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        from zserve.worker.engines.hf_batch import BatchRunner

        loaded: list[ServedModel] = []
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
        try:
            for where, local, names in self._specs:
                sm = await asyncio.to_thread(
                    load_model,
                    where,
                    local,
                    names,
                    self.device_option,
                    self.dtype_option,
                    self.context_override,
                    self.task,
                )
                if sm.task == "generate":
                    sm.runner = BatchRunner(
                        sm.model, names[0], self.max_batch_size, self.prefill_budget,
                        threads=self.threads, batch_prefill=self.batch_prefill,
                    )
                    sm.runner.start()
                loaded.append(sm)
                for n in names:
                    self._served[n] = sm
        except BaseException:
            await self.close()  # stop the batch threads already started
            raise
        gen = [m.context_length for m in loaded if m.task == "generate"]
        self.context_length = min(gen or [m.context_length for m in loaded])

    async def close(self) -> None:
        runners = {id(m): m.runner for m in self._served.values() if m.runner is not None}
        for r in runners.values():
            await asyncio.to_thread(r.close)

    def stats(self) -> dict[str, int]:
        """Counters for benches: decode steps, largest batch, requests active..."""
        runners = {id(m): m.runner for m in self._served.values() if m.runner is not None}
        rs = list(runners.values())
        return {
            "steps": sum(r.steps for r in rs),
            "prefills": sum(r.prefills for r in rs),
            "prefill_passes": sum(r.prefill_passes for r in rs),
            "tokens": sum(r.tokens for r in rs),
            "max_batch_size": max((r.max_batch_seen for r in rs), default=0),
            "active": sum(r.active for r in rs),
        }

    # ------------------------------------------------------------ helpers

    def _model(self, name: str) -> ServedModel:
        sm = self._served.get(name)
        if sm is None:
            if not self._served and name in self.models:
                raise EngineError("engine not started")
            raise ModelNotFound(f"this worker does not serve {name!r}")
        return sm

    def _prompt_ids(
        self,
        sm: ServedModel,
        request: GenerateRequest,
        special: bool | None = None,
        generation_prompt: bool = True,
    ) -> list[int]:
        """The prompt's ids; ``special`` (add the tokenizer's special
        tokens): None for the default, on for a prompt and off for messages."""
        tok = sm.tokenizer
        if request.prompt_ids is not None:
            bad = [t for t in request.prompt_ids if t >= sm.vocab_size]
            if bad:
                raise BadRequest(f"prompt token id {bad[0]} is not below the vocabulary "
                                 f"size {sm.vocab_size}")  # fmt: skip
            return list(request.prompt_ids)
        if request.messages is not None:
            if getattr(tok, "chat_template", None):
                text = render_chat(tok, request.messages, request.tools, generation_prompt)
            else:
                text = "".join(
                    f"{m['role']}: {plain_message(m)['content']}\n" for m in request.messages
                )
                text += "assistant:"
            _check_chars(sm, text)
            return list(tok(text, add_special_tokens=bool(special), verbose=False)["input_ids"])
        if request.prompt is None:
            raise BadRequest("one of prompt or messages is required")
        _check_chars(sm, request.prompt)
        special = special is not False
        return list(tok(request.prompt, add_special_tokens=special, verbose=False)["input_ids"])

    # ------------------------------------------------------------ generate

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        from zserve.worker.engines.hf_batch import Sequence
        from zserve.worker.engines.hf_sampling import SamplerState

        sm = self._model(request.model)
        if sm.runner is None:
            raise BadRequest(f"model {request.model!r} serves embeddings only")
        params = request.params
        try:
            params.validate()
        except ValueError as e:
            raise BadRequest(str(e)) from e
        if request.request_id in self._seqs:
            raise BadRequest(f"request id {request.request_id!r} is already running")
        if _input_chars(request) > _TOKENIZE_INLINE_CHARS:
            prompt_ids = await asyncio.to_thread(self._prompt_ids, sm, request)
        else:
            prompt_ids = self._prompt_ids(sm, request)
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise BadRequest("the prompt is empty")
        if n_prompt >= sm.context_length:
            raise ContextOverflow(
                f"the prompt has {n_prompt} tokens; this model's context is "
                f"{sm.context_length} tokens"
            )
        cont = request.continue_ids
        eos_ids = frozenset() if params.ignore_eos else sm.eos_ids
        stop_ids = frozenset(params.stop_token_ids)
        room = sm.context_length - n_prompt - len(cont)
        if room < 0:
            raise ContextOverflow(
                f"the prompt ({n_prompt} tokens) and the {len(cont)} tokens to continue "
                f"after pass this model's context of {sm.context_length} tokens"
            )
        by_token = bool(cont) and (cont[-1] in eos_ids or cont[-1] in stop_ids)
        # The text of the continued ids, rebuilt as the stream decoded it;
        # what the caller had not received (a stop string's possible
        # beginning) goes out first, as the uninterrupted run would send it.
        detok = await _detokenizer(
            sm.tokenizer, prompt_ids, cont[:-1] if by_token else cont, request.skip_special_tokens
        )
        stops = StopMatcher(params.stop)
        if request.continue_chars is not None:
            stops.hold(detok.replayed[request.continue_chars :])
        if cont and (room == 0 or by_token):
            # The uninterrupted run ended with the last continued token.
            text, hit = stops.feed(detok.flush())
            finish = FINISH_STOP if by_token or hit else FINISH_LENGTH
            text += "" if hit else stops.flush()
            yield Delta(text, [], finish, {"prompt_tokens": n_prompt, "completion_tokens": 0})
            return
        scored = None  # the prompt's logprobs, for the first delta
        if params.prompt_logprobs is not None and not cont:
            scored = await asyncio.to_thread(
                _score_prompt, sm, prompt_ids, params.prompt_logprobs
            )
            if params.max_tokens == 0:  # the prompt scored, nothing generated
                usage0 = {"prompt_tokens": n_prompt, "completion_tokens": 0}
                yield Delta("", [], FINISH_LENGTH, usage0, prompt_logprobs=scored)
                return
        max_new = min(params.max_tokens or room, room)
        grammar = await self._grammar(sm, params, max_new, cont)
        seq = Sequence(
            request_id=request.request_id,
            prompt_ids=prompt_ids + cont,  # the continued tokens are prefilled with the prompt
            max_new=max_new,
            eos_ids=eos_ids,
            stop_ids=stop_ids,
            sampler=SamplerState.create(
                params, prompt_ids, sm.vocab_size, sm.runner.device, output_ids=cont
            ),
            loop=asyncio.get_running_loop(),
            grammar=grammar,
        )
        rid = request.request_id

        def forget() -> None:
            if self._seqs.get(rid, (None,))[0] is seq:
                del self._seqs[rid]

        seq.on_done = forget
        self._seqs[rid] = (seq, sm)
        try:
            sm.runner.add(seq)
        except RuntimeError as e:  # closed
            forget()
            raise EngineError(str(e)) from e

        want_lp = params.logprobs is not None
        usage: dict[str, int] | None = {"prompt_tokens": n_prompt}
        count = 0
        ended = False
        try:
            while not ended:
                if not seq.pending:
                    if seq.done.is_set():
                        return  # aborted (engine.abort) while we were reading
                    seq.ready.clear()
                    await seq.ready.wait()
                    continue
                steps, seq.pending = seq.pending, []
                ids: list[int] = []
                parts: list[str] = []
                finish: str | None = None
                # Token by token, so that a stop string ends the ids where it ends.
                for st in steps:
                    if st.finish == FINISH_ERROR:
                        ended = True
                        raise EngineError(st.error or "generation failed")
                    ids.append(st.token)
                    finish = st.finish
                    stopped_by_token = finish == FINISH_STOP and (
                        st.token in seq.stop_ids or st.token in seq.eos_ids
                    )
                    # The stopping token's text is not sent.
                    piece = "" if stopped_by_token else detok.push([st.token])
                    if finish is not None:
                        piece += detok.flush()
                    piece, hit = stops.feed(piece)
                    parts.append(piece)
                    if hit:
                        finish = FINISH_STOP
                    elif finish is not None:
                        parts.append(stops.flush())
                    if finish is not None:
                        break
                count += len(ids)
                text = "".join(parts)
                logprobs = None
                if want_lp:
                    logprobs = [_lp_entry(sm, s) for s in steps[: len(ids)]]
                if finish is not None:
                    ended = True
                    usage = {"prompt_tokens": n_prompt, "completion_tokens": count}
                yield Delta(text, ids, finish, usage, logprobs, prompt_logprobs=scored)
                usage = scored = None
        finally:
            if not seq.gone:
                seq.cancelled = True
                sm.runner.wake()

    async def _grammar(
        self, sm: ServedModel, params: SamplingParams, max_new: int, cont: list[int]
    ) -> Any:
        """A structured request's grammar state (None without ``structured``),
        advanced through the continued ids; ``BadRequest`` when the spec does
        not compile or the continued ids do not fit it."""
        spec = params.structured
        if spec is None:
            return None
        g = self._grammars.get(id(sm))
        if g is None:  # the tokenizer's vocabulary, read once (off the event loop)
            g = await asyncio.to_thread(_new_grammars, sm)
            g = self._grammars.setdefault(id(sm), g)
        from zserve.worker.grammar import argmax_only

        greedy = argmax_only(params)
        try:
            if g.cached(spec):
                row = g.row(spec, max_new, greedy)
            else:
                row = await asyncio.to_thread(g.row, spec, max_new, greedy)
        except ValueError as e:
            raise BadRequest(str(e)) from e
        if cont and not row.replay(cont):
            raise BadRequest("continue_ids do not follow the grammar of structured")
        return row

    async def abort(self, request_id: str) -> None:
        entry = self._seqs.get(request_id)
        if entry is None:
            return
        seq, sm = entry
        seq.cancelled = True
        sm.runner.wake()
        try:
            await asyncio.wait_for(seq.done.wait(), ABORT_WAIT)
        except TimeoutError:
            log.warning("request %s still in the batch %.0f s after abort", request_id, ABORT_WAIT)

    # ------------------------------------------------------------ embeddings

    async def embed(self, model: str, texts: list[str]) -> tuple[list[list[float]], int]:
        """Unit vectors by mean pooling; texts longer than the model's max length are truncated."""
        sm = self._model(model)
        if not texts:
            return [], 0
        return await asyncio.to_thread(self._embed_sync, sm, texts)

    def _embed_sync(self, sm: ServedModel, texts: list[str]) -> tuple[list[list[float]], int]:
        import torch

        vectors: list[list[float]] = []
        n_tokens = 0
        device = next(sm.model.parameters()).device
        tok = sm.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        with torch.inference_mode():
            for i in range(0, len(texts), self.embed_batch_size):
                batch = texts[i : i + self.embed_batch_size]
                enc = tok(
                    batch,
                    padding=True,
                    truncation=True,
                    max_length=sm.embed_max_length,
                    return_tensors="pt",
                ).to(device)
                if is_causal(sm.model):
                    out = sm.model(**enc, output_hidden_states=True)
                    hidden = out.hidden_states[-1]
                else:
                    hidden = sm.model(**enc)[0]
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
                vectors.extend(pooled.cpu().tolist())
                n_tokens += int(enc["attention_mask"].sum())
        return vectors, n_tokens

    def tokenizer(self, model: str) -> Any:
        return self._model(model).tokenizer

    async def count_tokens(self, model: str, text: str) -> int:
        """Tokens ``text`` takes as a prompt (special tokens included)."""
        sm = self._model(model)
        return len(sm.tokenizer(text, verbose=False)["input_ids"])

    async def decode(self, model: str, ids: list[int]) -> str:
        text = self._model(model).tokenizer.decode(ids, skip_special_tokens=True)
        return text.rstrip("\ufffd")

    async def continued_text(self, request: GenerateRequest) -> str:
        """The continued ids' text as ``generate`` replays it (the prompt as
        context, special tokens as the request says; a last id that stopped
        the request gave no text): what primes a tool-call converter."""
        sm = self._model(request.model)
        if _input_chars(request) > _TOKENIZE_INLINE_CHARS:
            prompt_ids = await asyncio.to_thread(self._prompt_ids, sm, request)
        else:
            prompt_ids = self._prompt_ids(sm, request)
        p = request.params
        cont = request.continue_ids
        ends = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else sm.eos_ids)
        if cont and cont[-1] in ends:
            cont = cont[:-1]
        detok = await _detokenizer(sm.tokenizer, prompt_ids, cont, request.skip_special_tokens)
        return detok.replayed

    async def tokenize(
        self,
        request: GenerateRequest,
        add_special_tokens: bool | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        sm = self._model(request.model)
        args = (sm, request, add_special_tokens, add_generation_prompt)
        if _input_chars(request) > _TOKENIZE_INLINE_CHARS:
            return await asyncio.to_thread(self._prompt_ids, *args)
        return self._prompt_ids(*args)

    async def detokenize(self, model: str, ids: list[int]) -> str:
        tok = self._model(model).tokenizer
        if len(ids) > _TOKENIZE_INLINE_CHARS:
            return str(await asyncio.to_thread(tok.decode, ids))
        return str(tok.decode(ids))


def _new_grammars(sm: ServedModel) -> Any:
    from zserve.worker.grammar import Grammars

    return Grammars(sm.tokenizer, sm.vocab_size, sm.eos_ids)


def _flag(value: Any) -> bool:
    """An engine argument read as a boolean (``--engine-arg K=false`` gives a string)."""
    if isinstance(value, str):
        if value.strip().lower() in ("0", "false", "no", "off"):
            return False
        if value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        raise ValueError(f"expected true or false, not {value!r}")
    return bool(value)


async def _detokenizer(
    tokenizer: Any, prompt_ids: list[int], cont: list[int], skip_special: bool = True
) -> IncrementalDetokenizer:
    """The request's detokenizer, primed with the continued ids (a long replay
    runs in a thread, so that other streams keep flowing)."""
    if len(cont) <= _REPLAY_INLINE_IDS:
        return IncrementalDetokenizer(tokenizer, prompt_ids, skip_special, cont)
    return await asyncio.to_thread(
        IncrementalDetokenizer, tokenizer, prompt_ids, skip_special, cont
    )


def _input_chars(request: GenerateRequest) -> int:
    """About how many characters a request's prompt renders to (its messages'
    text), without rendering it."""
    if request.messages is None:
        return len(request.prompt or "")
    n = 0
    for m in request.messages:
        for v in m.values() if isinstance(m, dict) else ():
            if isinstance(v, str):
                n += len(v)
            elif isinstance(v, list):
                n += sum(len(str(x.get("text") or "")) for x in v if isinstance(x, dict))
    return n


def _check_chars(sm: ServedModel, text: str) -> None:
    """Refuse a prompt that cannot fit the context, before tokenizing it:
    ``ContextOverflow`` past context_length x the most characters one token
    stands for (where the tokenizer bounds it: ``hf_load.max_token_chars``)."""
    most = sm.context_length * sm.max_token_chars
    if most and len(text) > most:
        raise ContextOverflow(
            f"the prompt has {len(text)} characters, more than this model's context of "
            f"{sm.context_length} tokens can hold (at most {sm.max_token_chars} characters "
            "a token)"
        )


PROMPT_CHUNK = 512  # prompt tokens scored per forward pass (bounds the logits held)


def _score_prompt(sm: ServedModel, ids: list[int], top: int) -> list[dict[str, Any]]:
    """The prompt's logprobs, as logprobs entries (the first token's logprob
    None): the model's raw distribution at each position, from a prefill of
    their own (in chunks over a KV cache, without touching the batch), in
    float32 whatever the model's dtype."""
    import torch

    model = sm.model
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    out: list[dict[str, Any]] = [{"token": sm.text_of(ids[0]), "logprob": None,
                                  "top_logprobs": None}]  # fmt: skip
    cache = None
    with torch.inference_mode():
        for a in range(0, len(ids) - 1, PROMPT_CHUNK):
            b = min(a + PROMPT_CHUNK, len(ids) - 1)  # positions a..b-1 predict a+1..b
            res = model(input_ids=x[:, a:b], past_key_values=cache, use_cache=True)
            cache = res.past_key_values
            lp = torch.log_softmax(res.logits[0].float(), dim=-1)
            chosen = lp.gather(1, x[0, a + 1 : b + 1, None])[:, 0].tolist()
            tv: list[list[float]] = []
            ti: list[list[int]] = []
            if top:
                tops = lp.topk(top, dim=-1)
                tv, ti = tops.values.tolist(), tops.indices.tolist()
            for i in range(b - a):
                alts = []
                if top:
                    alts = [{"token": sm.text_of(t), "logprob": v}
                            for t, v in zip(ti[i], tv[i], strict=True)]  # fmt: skip
                tid = ids[a + 1 + i]
                out.append({"token": sm.text_of(tid), "logprob": chosen[i], "top_logprobs": alts})
    return out


def _lp_entry(sm: ServedModel, step: Any) -> dict[str, Any]:
    return {
        "token": sm.text_of(step.token),
        "logprob": step.logprob,
        "top_logprobs": [{"token": sm.text_of(t), "logprob": lp} for t, lp in step.top or []],
    }


__all__ = ["HFEngine"]
