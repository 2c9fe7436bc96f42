"""The base of every loss-term callback: coefficient, warm-up, cadence, registration, settings in the checkpoint.

A subclass sets ``name`` (the default term name, hence the logged tags ``train/<name>`` and ``train/<name>_coeff``)
and implements :meth:`LossTermCallback.raw`; everything else is here, once:

  * ``coeff`` / ``warmup_steps`` / ``every_n_steps`` checked in ``__init__`` (an ``InputError`` naming
    ``<Class>.<key>``);
  * :meth:`LossTermCallback.coefficient`: 0 on off-cadence steps, else ``coeff`` after a linear warm-up;
  * registration with the module's ``add_loss_term`` in ``setup`` and removal in ``teardown``;
  * the term's settings in the callback's ``state_dict``: resuming a checkpoint written with other settings is an
    ``InputError`` naming the key, instead of a run that silently changed its objective half-way.

A term that needs data draws its own side batch by step, rank and world size (:mod:`em_lightning.side_data`),
never the training micro-batch: the module evaluates terms once per optimizer step, on the first micro-batch of
the accumulation window only.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import lightning as L
import torch

from em_lightning.errors import InputError
from em_lightning.side_data import SideChatSet


class LossTermCallback(L.Callback, ABC):
    """Adds ``coefficient(step) × raw(module, step)`` to the training loss (see ``callbacks/README.md``).

    The module's ``add_loss_term`` does the weighting (the step's gradient is ``coefficient · ∇raw`` whatever the
    accumulation or world size), sums the term into the loss ``training_step`` returns and logs ``train/<name>``
    (raw) and ``train/<name>_coeff``. On off-cadence steps (``every_n_steps`` > 1) the raw term is 0 and not
    computed, and the coefficient is 0; the coefficient of an active step is ``coeff`` (not ``coeff × N``).

    Args:
        coeff: the weight once warmed up.
        warmup_steps: optimizer steps over which the coefficient rises linearly from 0 to ``coeff``.
        every_n_steps: evaluate the term on every N-th optimizer step only (its cost too).
        name: the loss-term name, hence the logged tags; None: the class's ``name``. Two instances need two names.
    """

    name: str = ""  # subclasses set the default term name

    def __init__(self, coeff: float = 0.1, warmup_steps: int = 0, every_n_steps: int = 1, name: str | None = None):
        if name is not None:
            self.name = name
        self.coeff, self.warmup_steps, self.every_n_steps = coeff, warmup_steps, every_n_steps
        self.check(
            ("coeff", isinstance(coeff, (int, float)) and math.isfinite(coeff) and coeff >= 0,
             "must be a finite number >= 0"),
            ("warmup_steps", isinstance(warmup_steps, int) and warmup_steps >= 0, "must be an integer >= 0"),
            ("every_n_steps", isinstance(every_n_steps, int) and every_n_steps >= 1, "must be an integer >= 1"),
            ("name", isinstance(self.name, str) and bool(self.name), "must be a non-empty string"),
        )

    def check(self, *rules: tuple[str, bool, str]) -> None:
        """Raise an ``InputError`` naming ``<Class>.<key>`` for the first ``(key, ok, what it must be)`` not ok."""
        for key, ok, must in rules:
            if not ok:
                raise InputError(f"{type(self).__name__}.{key}: {must}, got {getattr(self, key, None)!r}")

    # ------------------------------------------------------------------------------------------------ the term
    @abstractmethod
    def raw(self, module, step: int) -> torch.Tensor:
        """The raw, differentiable scalar at optimizer step ``step`` (the module weights and logs it)."""

    def settings(self) -> dict[str, Any]:
        """What defines this term's objective; a resume must match it. Subclasses add their own keys."""
        return {"name": self.name, "coeff": self.coeff, "warmup_steps": self.warmup_steps,
                "every_n_steps": self.every_n_steps}

    def active(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def coefficient(self, step: int) -> float:
        """The weight at optimizer step ``step`` (0-based): 0 off-cadence, else a linear warm-up to ``coeff``."""
        if not self.active(step):
            return 0.0
        return self.coeff * min(1.0, step / self.warmup_steps) if self.warmup_steps else self.coeff

    def term(self, module) -> torch.Tensor:
        """What the module calls once per optimizer step: :meth:`raw`, or a constant 0 off-cadence."""
        step = module.trainer.global_step
        if not self.active(step):
            return torch.zeros((), device=module.device)
        return self.raw(module, step)

    # ------------------------------------------------------------------------------------------- life cycle
    def prepare(self, trainer, pl_module) -> None:
        """Per-fit preparation before registration, on every rank (e.g. read and tokenise side data)."""

    def release(self) -> None:
        """Drop per-fit caches at teardown (e.g. adapter layers found on the first call)."""

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        self.prepare(trainer, pl_module)  # every rank: bad data fails before training, naming file:line
        pl_module.add_loss_term(self.name, self.term, weight=self.coefficient)

    def teardown(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        pl_module.remove_loss_term(self.name)  # a second fit() with this callback registers afresh
        self.release()

    def on_exception(self, trainer, pl_module, exception):
        # A failed fit skips teardown: remove the term here, or a retry on the same module finds its name taken.
        pl_module.remove_loss_term(self.name)
        self.release()

    # ------------------------------------------------------------------------------------------- checkpoints
    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)  # two terms of one class keep their own state

    def state_dict(self) -> dict[str, Any]:
        return {"settings": self.settings()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved, now = state_dict.get("settings", {}), self.settings()
        for key in saved.keys() & now.keys():
            if saved[key] != now[key]:
                raise InputError(
                    f"{type(self).__name__}.{key}: the checkpoint was trained with {saved[key]!r}, this run sets "
                    f"{now[key]!r}; resume with the checkpoint's value (a loss term's settings are part of the "
                    "objective), or start a new run"
                )


class SideDataLossTerm(LossTermCallback):
    """A loss term evaluated on batches of its own chat set (KL to base, feature-space L2): the
    :class:`~em_lightning.side_data.SideChatSet` (``self.side``), its settings in the resume check, its tokenisation
    in ``prepare``, and the batch of a step (off-cadence steps share the draw of the active step before them).

    Args: ``coeff``, ``warmup_steps``, ``every_n_steps``, ``name`` as :class:`LossTermCallback`; the rest as
    :class:`~em_lightning.side_data.SideChatSet` (errors name ``<Class>.<key>``).
    """

    def __init__(self, coeff: float, warmup_steps: int, every_n_steps: int, name: str | None, *, data: str,
                 batch_size: int, max_length: int, max_rows: int | None, overlong_rows: str, seed: int):
        super().__init__(coeff=coeff, warmup_steps=warmup_steps, every_n_steps=every_n_steps, name=name)
        self.side = SideChatSet(data, batch_size, max_length, max_rows, overlong_rows, seed,
                                owner=type(self).__name__)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), **self.side.settings()}

    def prepare(self, trainer, pl_module) -> None:
        self.side.prepare(pl_module.tokenizer)

    def batch_rows(self, step: int, rank: int = 0, world: int = 1) -> list[int]:
        """Indices of the side rows this rank uses at optimizer ``step``."""
        return self.side.batch_rows(step // self.every_n_steps, rank, world)

    def batch(self, step: int, rank: int = 0, world: int = 1, device=None) -> dict:
        """The padded batch of :meth:`batch_rows`, on ``device``."""
        return self.side.collate(self.batch_rows(step, rank, world), device)

    def step_batch(self, module, step: int) -> dict:
        """This rank's side batch at ``step``, on the module's device."""
        trainer = module.trainer
        return self.batch(step, trainer.global_rank, trainer.world_size, module.device)


__all__ = ["LossTermCallback", "SideDataLossTerm"]
