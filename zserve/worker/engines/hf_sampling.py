"""Per-request logits processing and sampling for the hf engine's batch loop.

Every request carries its own parameters and its own ``torch.Generator``, so
a seeded request draws the same tokens whether it runs alone or beside
others. Order, as in transformers' ``generate``: penalties, then (greedy)
argmax, or temperature, top-k, top-p and a multinomial draw.

Logprobs are those of the model's own distribution (log-softmax of the raw
logits, before penalties and temperature), as vLLM reports them by default.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

from zserve.protocol import SamplingParams

GREEDY_EPS = 1e-5  # temperatures below this mean greedy

# One sampled token: (token id, its logprob or None, top alternatives or None).
# The id is FAILED where the row's probabilities are not finite (a NaN or an
# infinity in its logits): that row's request fails, the others go on.
Sampled = tuple[int, float | None, list[tuple[int, float]] | None]
FAILED = -1


def argmax_rows(x: torch.Tensor) -> list[int]:
    """The argmax of each row of ``x`` [N, V]. On the CPU in float32 through
    numpy, whose row argmax takes ~3 us for 32 x 1,024 logits where torch's
    takes ~60 (the same index: the first of equal maxima, a NaN first)."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return x.detach().numpy().argmax(-1).tolist()  # type: ignore[no-any-return]
    return x.argmax(-1).tolist()  # type: ignore[no-any-return]


@dataclass(eq=False)
class SamplerState:
    """What one request's sampler remembers between steps."""

    params: SamplingParams
    generator: torch.Generator | None = None
    # Tokens seen (prompt + output) for repetition_penalty, counts of output
    # tokens for presence/frequency penalties; allocated only when used.
    seen: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    penalised: bool = field(init=False, default=False)

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_ids: list[int],
        vocab: int,
        device: torch.device,
        output_ids: list[int] | None = None,
    ) -> SamplerState:
        """``output_ids``: tokens already generated for this request (a
        resumed request's ``continue_ids``); the penalties count them as the
        uninterrupted run would have."""
        st = cls(params)
        if params.temperature >= GREEDY_EPS:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            st.generator = torch.Generator(device=device).manual_seed(seed)
        if params.repetition_penalty != 1.0:
            st.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            ids = torch.tensor(
                [i for i in [*prompt_ids, *(output_ids or ())] if 0 <= i < vocab],
                dtype=torch.long,
                device=device,
            )
            st.seen[ids] = True
        if params.presence_penalty or params.frequency_penalty:
            st.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
            if output_ids:
                out = torch.tensor(
                    [i for i in output_ids if 0 <= i < vocab], dtype=torch.long, device=device
                )
                st.counts.index_add_(0, out, torch.ones(out.numel(), device=device))
        st.penalised = st.seen is not None or st.counts is not None
        return st

    def record(self, token: int) -> None:
        if token < 0:
            return
        if self.seen is not None and token < self.seen.numel():
            self.seen[token] = True
        if self.counts is not None and token < self.counts.numel():
            self.counts[token] += 1

    def penalise(self, row: torch.Tensor) -> torch.Tensor:
        p = self.params
        if self.seen is not None:
            penalised = torch.where(row < 0, row * p.repetition_penalty, row / p.repetition_penalty)
            row = torch.where(self.seen, penalised, row)
        if self.counts is not None:
            row = row - self.counts * p.frequency_penalty - (self.counts > 0) * p.presence_penalty
        return row


def _warp(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    row = row / p.temperature
    vocab = row.numel()
    if 0 < p.top_k < vocab:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens above it already reach top_p; the
        # most likely token always stays.
        drop = (probs.cumsum(-1) - probs) > p.top_p
        drop[0] = False
        row = row.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return row


def sample(
    logits: torch.Tensor, states: list[SamplerState], known: list[int | None] | None = None
) -> list[Sampled]:
    """Pick one token per row of ``logits`` ([batch, vocab], float32);
    ``known[i]``, where not None, is row ``i``'s token already (a greedy row
    whose argmax the grammar took, ``grammar.constrain_rows``)."""
    n = len(states)
    tokens: list[int | None] = list(known) if known is not None else [None] * n
    plain_greedy = [
        i
        for i, s in enumerate(states)
        if tokens[i] is None and s.params.temperature < GREEDY_EPS and not s.penalised
    ]
    if plain_greedy:
        idx = torch.tensor(plain_greedy, device=logits.device)
        picked = argmax_rows(logits.index_select(0, idx))
        for i, t in zip(plain_greedy, picked, strict=True):
            tokens[i] = t
    for i, st in enumerate(states):
        if tokens[i] is not None:
            continue
        row = st.penalise(logits[i]) if st.penalised else logits[i]
        if st.params.temperature < GREEDY_EPS:
            tokens[i] = int(row.argmax())
        else:
            probs = _warp(row, st.params).softmax(-1)
            if not bool(torch.isfinite(probs).all()):
                tokens[i] = FAILED  # multinomial would raise for the whole batch
                continue
            tokens[i] = int(torch.multinomial(probs, 1, generator=st.generator))

    want = [
        i for i, s in enumerate(states) if s.params.logprobs is not None and tokens[i] != FAILED
    ]
    lps: dict[int, tuple[float, list[tuple[int, float]]]] = {}
    if want:
        idx = torch.tensor(want, device=logits.device)
        logp = logits.index_select(0, idx).log_softmax(-1)
        for j, i in enumerate(want):
            k = int(states[i].params.logprobs or 0)
            chosen = float(logp[j, tokens[i]])
            top: list[tuple[int, float]] = []
            if k:
                vals, ids = torch.topk(logp[j], min(k, logp.shape[-1]))
                top = list(zip(ids.tolist(), vals.tolist(), strict=True))
            lps[i] = (chosen, top)

    out: list[Sampled] = []
    for i, st in enumerate(states):
        t = tokens[i]
        assert t is not None
        st.record(t)
        if i in lps:
            out.append((t, lps[i][0], lps[i][1]))
        else:
            out.append((t, None, None))
    return out
