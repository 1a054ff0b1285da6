"""Structured outputs on the vllm engine: a vLLM V1 logits processor that runs
zserve's own grammar policy (zserve/worker/grammar.py), so that the vllm and
hf engines pick the same tokens, the budget rule included.

vLLM's own structured outputs (``SamplingParams.structured_outputs``) cannot
serve zserve: its grammar sees generated tokens only, so a resumed request
(prompt + delivered ids) would start a new value instead of finishing the one
under way, it ignores the per-request whitespace option, and it has no budget
rule. This processor is loaded with the engine (``logits_processors`` in the
engine arguments, ``VLLMEngine`` adds it) and acts only on requests that opt
in with ``SamplingParams.extra_args[EXTRA_KEY] = {"spec": structured,
"continued": n, "greedy": bool}``: it replays the last ``n`` prompt ids (the delivered ones)
into the grammar before the first step.

It runs in vLLM's engine-core process, where an exception would kill the
engine: the front end (``VLLMEngine.generate``) has already compiled the spec
and replayed the continued ids, so a failure here is logged and the request
left unconstrained rather than raised. The matchers advance in
``update_state`` and again in ``apply`` (with async scheduling on a GPU the
output lists hold placeholders, -1, until just before ``apply``). A row whose
token ``apply`` settles (a greedy row's best token, a tight row's closing)
has it accepted there already; the engine's output then confirms it
(``RowState.delivered``), or undoes it should vLLM have sampled another.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from zserve.protocol import check_structured

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig

    from zserve.worker.grammar import Grammars, RowState

log = logging.getLogger(__name__)

EXTRA_KEY = "zs_structured"
FQCN = "zserve.worker.engines.vllm_grammar:GrammarLogitsProcessor"


class GrammarLogitsProcessor(LogitsProcessor):
    """Masks the rows of structured requests; leaves every other row alone."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        zs = (sampling_params.extra_args or {}).get(EXTRA_KEY)
        if zs is None:
            return
        if not isinstance(zs, dict) or not isinstance(zs.get("continued", 0), int):
            raise ValueError(f"extra_args[{EXTRA_KEY!r}] must be {{spec, continued}}")
        check_structured(zs.get("spec"))  # a ValueError naming structured

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self._model_config = vllm_config.model_config
        self._max_rows = int(vllm_config.scheduler_config.max_num_seqs)
        self._grammars: Grammars | None = None
        self._bitmask: torch.Tensor | None = None
        # batch index -> (its grammar state, the request's live output ids)
        self.rows: dict[int, tuple[RowState, list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def _g(self) -> Grammars:
        if self._grammars is None:  # the first structured request: read the vocabulary
            from vllm.tokenizers import cached_tokenizer_from_config

            from zserve.worker.engines.vllm import _eos_ids
            from zserve.worker.grammar import Grammars

            mc = self._model_config
            tok = cached_tokenizer_from_config(mc)
            self._grammars = Grammars(tok, mc.get_vocab_size(), _eos_ids(tok, mc))
        return self._grammars

    def _new_row(
        self, params: SamplingParams, prompt: list[int] | None, out: list[int]
    ) -> tuple[RowState, list[int]] | None:
        zs = (params.extra_args or {}).get(EXTRA_KEY)
        if zs is None:
            return None
        try:
            greedy = bool(zs.get("greedy", False))
            st = self._g().row(check_structured(zs["spec"]), params.max_tokens, greedy)
            n = int(zs.get("continued", 0))
            if n and not st.replay((prompt or [])[len(prompt or []) - n :]):
                log.error("structured request: the continued ids do not fit its grammar")
                return None
        except Exception:  # never raise in the engine core: leave the row unconstrained
            log.exception("structured request: no grammar")
            return None
        return st, out

    def _advance(self) -> None:
        for st, out in self.rows.values():
            while (k := st.delivered) < len(out) and out[k] >= 0:
                if not st.accept(out[k]):
                    log.error("structured request: a token outside its grammar")
                    st.n_out += 1  # skip it rather than loop

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._new_row)
        self._advance()

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        from zserve.worker.grammar import constrain_rows

        self._advance()
        if self._bitmask is None:
            import xgrammar as xgr

            self._bitmask = xgr.allocate_token_bitmask(self._max_rows, self._g().vocab_size)
        rows: list[RowState | None] = [None] * logits.shape[0]
        for i, (st, _) in self.rows.items():
            if i < len(rows):
                rows[i] = st
        constrain_rows(logits, rows, self._bitmask)
        return logits


def engine_extra(spec: dict[str, Any], continued: int, greedy: bool) -> dict[str, Any]:
    """``SamplingParams.extra_args`` for a structured request (``greedy``:
    ``grammar.argmax_only`` of its parameters)."""
    return {EXTRA_KEY: {"spec": spec, "continued": continued, "greedy": greedy}}


__all__ = ["EXTRA_KEY", "FQCN", "GrammarLogitsProcessor", "engine_extra"]
