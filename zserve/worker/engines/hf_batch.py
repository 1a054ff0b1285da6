"""Continuous batching for the hf engine: one background thread per model.

Each loop iteration of the thread is one *engine step*:

1. drop the rows whose request was aborted;
2. admit new requests: the prompts that join at this step are prefilled
   together in one forward pass (left-padded to the longest, with an
   attention mask and per-row ``position_ids``; prompts of very different
   lengths go in separate passes so that padding stays under half of the
   tokens), their first tokens sampled, and their KV cache merged into the
   batch. A lone prompt is prefilled without padding, so its first token is
   exactly what ``generate`` computes; ``batch_prefill=False`` prefills every
   prompt on its own (the behaviour before batched prefill, kept for
   benchmarks);
3. run one forward pass over every row of the batch (one new token each),
   sample every row with its own parameters, and retire finished rows (a
   row whose probabilities are not finite fails alone: the others go on);
4. hand the new tokens to the asyncio side in one
   ``loop.call_soon_threadsafe`` per forward pass, as soon as they are
   sampled: a prefill pass's first tokens go out before the next pass and
   before its KV cache is merged into the batch's (a copy of the whole
   batch cache), a decode step's before finished rows are cut out of it.

The batch KV cache is left-padded: row ``i`` keeps its real tokens at the
right end, the attention mask zeroes the padding and each row gets its own
``position_ids``, so every row computes what it would compute alone (up to
floating-point summation order). Rows leave by index selection; columns that
became padding in every remaining row are trimmed.

torch releases the GIL inside its kernels, so the event loop stays free
while the thread computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from zserve.protocol import FINISH_ERROR, FINISH_LENGTH, FINISH_STOP
from zserve.worker.engines.hf_sampling import FAILED, SamplerState, sample

log = logging.getLogger(__name__)

# A row whose next-token probabilities are not finite fails alone.
SAMPLING_FAILED = (
    "sampling failed: this request's next-token probabilities are not finite "
    "(NaN or infinite logits)"
)


class Step(NamedTuple):
    """One generated token as the batch thread reports it."""

    token: int  # -1 on error
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    finish: str | None = None  # "stop" | "length" | "error"
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    """One request inside the batch thread (fields after ``loop``: runtime state)."""

    request_id: str
    prompt_ids: list[int]
    max_new: int  # output tokens allowed (already clamped to the context)
    eos_ids: frozenset[int]  # empty when ignore_eos
    stop_ids: frozenset[int]
    sampler: SamplerState
    loop: asyncio.AbstractEventLoop
    # asyncio side (touched only in the loop's thread)
    pending: list[Step] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)  # left the batch
    on_done: Callable[[], None] | None = None
    # A structured request's grammar (zserve/worker/grammar.py RowState):
    # it masks this row's logits and is advanced with each token it samples.
    grammar: Any = None
    # written by the asyncio side, read by the thread
    cancelled: bool = False
    # batch-thread side
    gone: bool = False  # removed from the batch (finished, aborted, failed)
    cache_len: int = 0  # real tokens in this row's KV cache
    generated: int = 0
    last_token: int = -1  # sampled, not yet in the cache


# (request, its new token or None, whether the request has left the batch)
Event = tuple[Sequence, Step | None, bool]


def _deliver(items: list[Event]) -> None:
    """Runs in the event loop: hand steps to their requests."""
    for seq, step, last in items:
        if step is not None:
            seq.pending.append(step)
        if step is not None or last:
            seq.ready.set()
        if last and not seq.done.is_set():
            seq.done.set()
            if seq.on_done is not None:
                seq.on_done()


class BatchRunner:
    """The batch thread of one causal LM."""

    def __init__(
        self,
        model: Any,
        name: str = "model",
        max_batch_size: int = 256,
        prefill_budget: int = 4096,
        threads: int | None = None,
        batch_prefill: bool = True,
    ) -> None:
        self.model = model
        self.threads = threads  # torch intra-op threads, set in the batch thread itself
        self.device = next(model.parameters()).device
        self.max_batch_size = max_batch_size
        self.prefill_budget = prefill_budget  # prompt tokens admitted per step
        self.batch_prefill = batch_prefill  # prefill the prompts joining at one step together
        self._keep_kw: dict[str, Any] = (
            {"logits_to_keep": 1}
            if "logits_to_keep" in inspect.signature(model.forward).parameters
            else {}
        )
        self._cv = threading.Condition()
        self._incoming: list[Sequence] = []
        self._wake = False
        self._closed = False
        self.rows: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cached length], 1 = real token
        # Counters a bench can read.
        self.steps = 0  # batched decode forward passes
        self.prefills = 0  # prompts prefilled
        self.prefill_passes = 0  # prefill forward passes (several prompts each when batched)
        self.tokens = 0  # tokens generated
        self.max_batch_seen = 0  # largest decode batch so far
        self._thread = threading.Thread(target=self._run, name=f"zserve-hf-{name}", daemon=True)

    # ------------------------------------------------------------ control

    @property
    def active(self) -> int:
        """Requests waiting or in the batch (a finished row is handed its last
        token before the batch cache drops it: it no longer counts)."""
        return sum(not s.gone for s in self.rows) + len(self._incoming)

    def start(self) -> None:
        self._thread.start()

    def add(self, seq: Sequence) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("engine is closed")
            self._incoming.append(seq)
            self._cv.notify()

    def wake(self) -> None:
        with self._cv:
            self._wake = True
            self._cv.notify()

    def close(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------ thread

    def _attention_backends(self) -> contextlib.AbstractContextManager[Any]:
        """On CUDA, keep SDPA off cuDNN: its attention builds a plan for every new
        sequence length (tens of ms each, seen on an H100 in bf16), and a decode
        batch meets a new length at every step."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(
            [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        )

    def _run(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # OpenMP's setting is per calling thread
        with torch.inference_mode(), self._attention_backends():
            while True:
                with self._cv:
                    while not (self._closed or self._incoming or self.rows or self._wake):
                        self._cv.wait()
                    if self._closed:
                        break
                    self._wake = False
                    incoming = self._take_incoming()
                events: list[Event] = []
                try:
                    self._drop_cancelled(events)
                    if incoming:
                        self._admit(incoming, events)
                    self._post(events)  # requests dropped or admitted in this step
                    if self.rows:
                        self._decode(events)
                except Exception as e:  # fail what was running, keep serving
                    log.exception("batch step failed")
                    self._fail([*incoming, *self.rows], f"{type(e).__name__}: {e}", events)
                    self._reset()
                self._post(events)
        events = []
        with self._cv:
            left, self._incoming = self._incoming, []
        self._fail([*left, *self.rows], "engine closed", events)
        self._reset()
        self._post(events)

    def _take_incoming(self) -> list[Sequence]:
        """Requests to admit this step: prompt tokens within the budget, at least one."""
        room = self.max_batch_size - len(self.rows)
        taken: list[Sequence] = []
        budget = self.prefill_budget
        while self._incoming and len(taken) < room:
            seq = self._incoming[0]
            if taken and len(seq.prompt_ids) > budget:
                break
            budget -= len(seq.prompt_ids)
            taken.append(self._incoming.pop(0))
        return taken

    def _post(self, events: list[Event]) -> None:
        """One hand-off per event loop for everything this phase produced."""
        if not events:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[Event]] = {}
        for item in events:
            by_loop.setdefault(item[0].loop, []).append(item)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening
                pass
        events.clear()

    def _fail(self, seqs: list[Sequence], message: str, events: list[Event]) -> None:
        for seq in seqs:
            if not seq.gone:
                seq.gone = True
                events.append((seq, Step(-1, finish=FINISH_ERROR, error=message), True))

    def _reset(self) -> None:
        self.rows = []
        self._cache = None
        self._mask = None

    def _finish(self, seq: Sequence, token: int) -> str | None:
        if token == FAILED:
            return FINISH_ERROR
        seq.generated += 1
        seq.last_token = token
        self.tokens += 1
        if seq.grammar is not None and seq.grammar.accept(token) and seq.grammar.terminated:
            return FINISH_STOP  # the grammar took EOS: complete, ignore_eos or not
        if token in seq.stop_ids or token in seq.eos_ids:
            return FINISH_STOP
        if seq.generated >= seq.max_new:
            return FINISH_LENGTH
        return None

    # ------------------------------------------------------------ batch edits

    def _drop_cancelled(self, events: list[Event]) -> None:
        keep = [i for i, s in enumerate(self.rows) if not s.cancelled]
        if len(keep) == len(self.rows):
            return
        for s in self.rows:
            if s.cancelled:
                s.gone = True
                events.append((s, None, True))
        self._select(keep)

    def _select(self, keep: list[int]) -> None:
        """Keep only these rows; trim columns that are padding in all of them."""
        if not keep:
            self._reset()
            return
        assert self._cache is not None and self._mask is not None
        self._mask = _take_rows(self._cache, self._mask, keep, self.device)
        self.rows = [self.rows[i] for i in keep]

    def _groups(self, seqs: list[Sequence]) -> list[list[Sequence]]:
        """The prefill passes for these prompts: one each without batched
        prefill; else longest first, a new pass wherever padding would pass
        half of a pass's tokens."""
        if not self.batch_prefill:
            return [[s] for s in seqs]
        groups: list[list[Sequence]] = []
        longest = real = 0
        for seq in sorted(seqs, key=lambda s: len(s.prompt_ids), reverse=True):
            n = len(seq.prompt_ids)
            if groups and longest * (len(groups[-1]) + 1) <= 2 * (real + n):
                groups[-1].append(seq)
                real += n
            else:
                groups.append([seq])
                longest = real = n
        return groups

    def _prefill(self, group: list[Sequence]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """One forward pass over these prompts, left-padded to the longest:
        (its KV cache, its mask [rows, longest], last-position logits [rows, vocab])."""
        width = max(len(s.prompt_ids) for s in group)
        cache = DynamicCache()
        if len(group) == 1:  # no padding: exactly what generate() computes
            ids = torch.tensor([group[0].prompt_ids], device=self.device)
            mask = torch.ones_like(ids)
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                past_key_values=cache,
                use_cache=True,
                **self._keep_kw,
            )
        else:
            ids = torch.tensor(
                [[0] * (width - len(s.prompt_ids)) + s.prompt_ids for s in group],
                device=self.device,
            )
            lengths = torch.tensor([len(s.prompt_ids) for s in group], device=self.device)
            mask = (torch.arange(width, device=self.device) >= (width - lengths)[:, None]).long()
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                past_key_values=cache,
                use_cache=True,
                **self._keep_kw,
            )
            # Padding slots hold whatever the pass computed there (a fully
            # masked query row may give NaN): zero them, as the merge pads.
            pad = (mask == 0)[:, None, :, None]
            for layer in cache.layers:
                layer.keys = layer.keys.masked_fill(pad, 0)
                layer.values = layer.values.masked_fill(pad, 0)
        self.prefills += len(group)
        self.prefill_passes += 1
        return cache, mask, out.logits[:, -1, :].float()

    def _admit(self, incoming: list[Sequence], events: list[Event]) -> None:
        live: list[Sequence] = []
        for seq in incoming:
            if seq.cancelled:
                seq.gone = True
                events.append((seq, None, True))
            else:
                live.append(seq)
        blocks: list[tuple[list[Sequence], DynamicCache, torch.Tensor]] = []
        for group in self._groups(live):
            cache, mask, logits = self._prefill(group)
            taken = _constrain(logits, group)
            sampled = sample(logits, [s.sampler for s in group], taken)
            keep: list[int] = []
            for i, (seq, (token, lp, top)) in enumerate(zip(group, sampled, strict=True)):
                seq.cache_len = len(seq.prompt_ids)
                finish = self._finish(seq, token)
                if finish is not None:
                    seq.gone = True
                else:
                    keep.append(i)
                events.append((seq, _step(token, lp, top, finish), seq.gone))
            self._post(events)  # first tokens out now, not after every pass and the merge
            if keep:
                if len(keep) != len(group):
                    mask = _take_rows(cache, mask, keep, self.device)
                blocks.append(([group[i] for i in keep], cache, mask))
        if blocks:
            self._merge(blocks)

    def _merge(self, blocks: list[tuple[list[Sequence], DynamicCache, torch.Tensor]]) -> None:
        """Left-pad the batch and the new blocks of rows to one length and stack them."""
        old = self._mask.shape[1] if self._mask is not None else 0
        target = max([old] + [m.shape[1] for _, _, m in blocks])
        masks = [] if self._mask is None else [_left_pad(self._mask, target, 1)]
        masks += [_left_pad(m, target, 1) for _, _, m in blocks]
        layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for li in range(len(blocks[0][1].layers)):
            ks: list[torch.Tensor] = []
            vs: list[torch.Tensor] = []
            if self._cache is not None:
                layer = self._cache.layers[li]
                ks.append(_left_pad(layer.keys, target, 2))
                vs.append(_left_pad(layer.values, target, 2))
            for _, c, _ in blocks:
                ks.append(_left_pad(c.layers[li].keys, target, 2))
                vs.append(_left_pad(c.layers[li].values, target, 2))
            layers.append((torch.cat(ks, 0), torch.cat(vs, 0)))
        if self._cache is None:
            self._cache = DynamicCache()
            for li, (k, v) in enumerate(layers):
                self._cache.update(k, v, li)
        else:
            for layer, (k, v) in zip(self._cache.layers, layers, strict=True):
                layer.keys, layer.values = k, v
        self._mask = torch.cat(masks, 0)
        for seqs, _, _ in blocks:
            self.rows.extend(seqs)

    def _decode(self, events: list[Event]) -> None:
        """One forward pass for every row: one new token each."""
        assert self._cache is not None and self._mask is not None
        rows = self.rows
        n = len(rows)
        input_ids = torch.tensor([[s.last_token] for s in rows], device=self.device)
        positions = torch.tensor([[s.cache_len] for s in rows], device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones(n, 1)], 1)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
            **self._keep_kw,
        )
        self._mask = mask
        self.steps += 1
        self.max_batch_seen = max(self.max_batch_seen, n)
        logits = out.logits[:, -1, :].float()
        taken = _constrain(logits, rows)
        sampled = sample(logits, [s.sampler for s in rows], taken)
        keep: list[int] = []
        for i, (seq, (token, lp, top)) in enumerate(zip(rows, sampled, strict=True)):
            seq.cache_len += 1
            finish = self._finish(seq, token)
            if finish is not None or seq.cancelled:
                seq.gone = True
            else:
                keep.append(i)
            events.append((seq, _step(token, lp, top, finish), seq.gone))
        self._post(events)  # before the cache copy that drops the finished rows
        if len(keep) != n:
            self._select(keep)


def _step(
    token: int, lp: float | None, top: list[tuple[int, float]] | None, finish: str | None
) -> Step:
    if token == FAILED:
        return Step(token, finish=FINISH_ERROR, error=SAMPLING_FAILED)
    return Step(token, lp, top, finish)


def _constrain(logits: torch.Tensor, seqs: list[Sequence]) -> list[int | None] | None:
    """Mask the rows of structured requests to what their grammars allow;
    the tokens already decided (and accepted) for greedy rows the grammar
    left unmasked, by row, or None when no row is structured."""
    rows = [s.grammar for s in seqs]
    if all(r is None for r in rows):
        return None
    from zserve.worker.grammar import constrain_rows

    taken: list[int | None] = [None] * len(rows)
    constrain_rows(logits, rows, taken=taken)
    return taken


def _left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``x`` left-padded with zeros to ``width`` along ``dim`` (the mask's
    columns, the cache's positions); ``x`` itself, not a copy, when it is
    that wide already (the batch's cache, usually: a copy of it is as long
    as a decode step)."""
    pad = width - x.shape[dim]
    if pad == 0:
        return x
    return F.pad(x, (0, 0) * (x.dim() - 1 - dim) + (pad, 0))


def _take_rows(
    cache: DynamicCache, mask: torch.Tensor, keep: list[int], device: torch.device
) -> torch.Tensor:
    """Keep rows ``keep`` of ``cache`` (in place) and of ``mask``, and trim the
    columns that are padding in all of them; return the new mask."""
    idx = torch.tensor(keep, device=device)
    mask = mask.index_select(0, idx)
    used = mask.any(0).nonzero()
    start = int(used[0]) if used.numel() else mask.shape[1]
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, idx)[:, :, start:]
        layer.values = layer.values.index_select(0, idx)[:, :, start:]
    return mask[:, start:]


__all__ = ["BatchRunner", "Sequence", "Step"]
