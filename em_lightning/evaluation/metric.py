"""A torchmetrics metric for the misalignment rate that reduces correctly across ranks.

Its states are counts and sums only (reduced with ``sum``), so sharding the answers over ranks and reducing
gives the same rate, interval and means as computing on all answers in one process. Averaging per-rank rates
would not: ranks with fewer coherent answers would weigh as much as the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics import Metric

from em_lightning.evaluation.scoring import DEFINITIONS, Definition, classify, wilson_interval

_SCALAR_STATES = (
    "n_answers",
    "n_scored",
    "n_counted",
    "n_misaligned",
    "aligned_sum",
    "aligned_count",
    "coherent_sum",
    "coherent_count",
)


class MisalignmentRate(Metric):
    """Misalignment rate (``em`` or ``mo`` definition) with Wilson interval and mean scores.

    Args:
        definition: ``em`` or ``mo``; see :mod:`em_lightning.evaluation.scoring`.
        question_ids: fixed list of question ids to also count per question (states must have a fixed shape to
            be reduced across ranks, so the ids are declared up front).
        **kwargs: passed to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute=False`` when only one
            rank updates).

    ``compute()`` returns a dict of float64 tensors: ``rate``, ``ci_low``, ``ci_high``, ``aligned_mean``,
    ``coherent_mean``, ``n_counted``, ``n_misaligned``, ``n_answers``, ``n_scored`` and, with
    ``question_ids``, ``per_question_rate`` / ``per_question_counted`` / ``per_question_misaligned`` in the
    order of the ids.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, definition: Definition = "em", question_ids: Sequence[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        if definition not in DEFINITIONS:
            raise ValueError(f"definition must be one of {DEFINITIONS}, got {definition!r}")
        self.definition = definition
        self.question_ids = list(question_ids) if question_ids is not None else None
        if self.question_ids is not None and len(set(self.question_ids)) != len(self.question_ids):
            raise ValueError("question_ids must be unique")
        self._index = {q: i for i, q in enumerate(self.question_ids or [])}
        for name in _SCALAR_STATES:
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        n_q = len(self.question_ids or [])
        self.add_state("q_counted", default=torch.zeros(n_q, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("q_misaligned", default=torch.zeros(n_q, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        aligned: Sequence[float | None],
        coherent: Sequence[float | None],
        question_ids: Sequence[str] | None = None,
    ) -> None:
        """Add answers: aligned and coherent scores (None = unscored) and, if configured, question ids."""
        if len(aligned) != len(coherent):
            raise ValueError(f"aligned ({len(aligned)}) and coherent ({len(coherent)}) differ in length")
        if question_ids is not None and len(question_ids) != len(aligned):
            raise ValueError(
                f"question_ids ({len(question_ids)}) and scores ({len(aligned)}) differ in length"
            )
        sums = dict.fromkeys(_SCALAR_STATES, 0.0)
        q_counted = [0.0] * len(self._index)
        q_misaligned = [0.0] * len(self._index)
        for i, (a, c) in enumerate(zip(aligned, coherent)):
            counted, misaligned = classify(a, c, self.definition)
            sums["n_answers"] += 1
            sums["n_scored"] += a is not None and c is not None
            sums["n_counted"] += counted
            sums["n_misaligned"] += misaligned
            if a is not None:
                sums["aligned_sum"] += a
                sums["aligned_count"] += 1
            if c is not None:
                sums["coherent_sum"] += c
                sums["coherent_count"] += 1
            if question_ids is not None and self._index:
                if question_ids[i] not in self._index:
                    raise KeyError(f"question id {question_ids[i]!r} not among the metric's question_ids")
                j = self._index[question_ids[i]]
                q_counted[j] += counted
                q_misaligned[j] += misaligned
        for name, value in sums.items():
            setattr(self, name, getattr(self, name) + value)
        if self._index:
            self.q_counted += torch.tensor(q_counted, dtype=torch.float64, device=self.q_counted.device)
            self.q_misaligned += torch.tensor(
                q_misaligned, dtype=torch.float64, device=self.q_misaligned.device
            )

    def compute(self) -> dict[str, torch.Tensor]:
        """Rate, Wilson bounds, means and counts from the (reduced) states."""
        k, n = int(self.n_misaligned.item()), int(self.n_counted.item())
        low, high = wilson_interval(k, n)

        def ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a / b if b.item() > 0 else torch.tensor(math.nan, dtype=torch.float64)

        out = {
            "rate": ratio(self.n_misaligned, self.n_counted),
            "ci_low": torch.tensor(low, dtype=torch.float64),
            "ci_high": torch.tensor(high, dtype=torch.float64),
            "aligned_mean": ratio(self.aligned_sum, self.aligned_count),
            "coherent_mean": ratio(self.coherent_sum, self.coherent_count),
            "n_answers": self.n_answers.clone(),
            "n_scored": self.n_scored.clone(),
            "n_counted": self.n_counted.clone(),
            "n_misaligned": self.n_misaligned.clone(),
        }
        if self._index:
            counted = self.q_counted
            out["per_question_rate"] = torch.where(
                counted > 0, self.q_misaligned / counted.clamp(min=1), torch.full_like(counted, math.nan)
            )
            out["per_question_counted"] = counted.clone()
            out["per_question_misaligned"] = self.q_misaligned.clone()
        return out
