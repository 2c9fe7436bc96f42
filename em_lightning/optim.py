"""Optimisers and learning-rate schedules that the module builds from config.

Any ``torch.optim.Optimizer`` class can be named by ``class_path`` in ``model.optimizer``. Muon (``torch.optim.Muon``)
only accepts 2-D parameters; :class:`MuonWithAdamW` is the one optimiser object (Lightning's automatic optimisation
takes one) that sends 2-D matrices to Muon and anything else to AdamW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch.optim import AdamW, Muon, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from em_lightning.errors import InputError


class MuonWithAdamW(Optimizer):
    """Muon for every 2-D parameter, AdamW for the rest, as a single optimiser.

    Both halves share this object's ``param_groups`` (tagged ``kind``) and ``state``, so ``state_dict`` /
    ``load_state_dict`` and LR schedulers see one ordinary optimiser. For LoRA every adapter matrix is 2-D, so the AdamW
    half is usually empty; it exists for biases, norms or DoRA magnitudes when those are trained.

    Args:
        lr, weight_decay, momentum, nesterov, ns_steps: Muon's settings (``torch.optim.Muon``; note its default
            weight decay is 0.1).
        adjust_lr_fn: Muon's per-matrix LR adjustment. ``None``/"original" scales by √max(1, rows/cols), so a LoRA B
            (d_out×r) moves √(d_out/r) times faster than A; "match_rms_adamw" gives both an AdamW-like update RMS.
            A scientific choice: it is recorded in the run's config.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW half.
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
    ):
        params = [p for p in _flatten_params(params) if p.requires_grad]
        matrices = [p for p in params if p.ndim == 2]
        others = [p for p in params if p.ndim != 2]
        if not params:
            raise ValueError("MuonWithAdamW got no trainable parameters")
        groups = []
        self._muon = self._adamw = None
        if matrices:
            group = {"params": matrices, "kind": "muon"}
            self._muon = Muon(
                [group], lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
            )  # fills Muon's defaults into `group`
            groups.append(group)
        if others:
            group = {"params": others, "kind": "adamw"}
            self._adamw = AdamW([group], lr=adamw_lr, betas=adamw_betas, eps=adamw_eps, weight_decay=adamw_weight_decay)
            groups.append(group)
        super().__init__(groups, defaults={})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for kind, inner in (("muon", self._muon), ("adamw", self._adamw)):
            if inner is None:
                continue
            # Re-link on every step: load_state_dict() replaces our group dicts and state.
            inner.param_groups = [g for g in self.param_groups if g["kind"] == kind]
            inner.state = self.state
            inner.step()
        return loss


def _flatten_params(params):
    out = []
    for item in params:
        if isinstance(item, dict):
            out.extend(item["params"])
        elif isinstance(item, tuple):  # (name, tensor)
            out.append(item[1])
        else:
            out.append(item)
    return out


def optimizer_class(factory) -> type | None:
    """The optimiser class behind ``model.optimizer`` (a class, or jsonargparse's partial holding it), if known."""
    if isinstance(factory, type):
        return factory
    return next((a for a in getattr(factory, "args", ()) if isinstance(a, type)), getattr(factory, "func", None))


def check_optimizer_params(cls, named_params: list[tuple[str, torch.Tensor]]) -> None:
    """Config-level errors, before the optimiser is built: plain ``torch.optim.Muon`` given a parameter that is not
    2-D, and Muon (either form) given sharded FSDP2 weights (its orthogonalisation needs whole matrices)."""
    if not isinstance(cls, type) or not issubclass(cls, (torch.optim.Muon, MuonWithAdamW)):
        return
    if any(hasattr(p, "to_local") for _, p in named_params):
        raise InputError(
            "model.optimizer: Muon orthogonalises whole matrices, and under FSDP2 each rank holds only rows of "
            "them; use DDP (configs/strategy/ddp.yaml) with Muon, or another optimiser with FSDP2"
        )
    if issubclass(cls, torch.optim.Muon):  # MuonWithAdamW routes the non-matrices to AdamW itself
        check_muon_params(named_params)


def check_muon_params(named_params: list[tuple[str, torch.Tensor]]) -> None:
    """Raise a config-level error when plain ``torch.optim.Muon`` would get a parameter that is not 2-D."""
    bad = [(n, tuple(p.shape)) for n, p in named_params if p.ndim != 2]
    if bad:
        shown = ", ".join(f"{n} {s}" for n, s in bad[:3])
        raise InputError(
            f"model.optimizer: torch.optim.Muon only takes 2-D parameters, but {len(bad)} trainable parameters are "
            f"not 2-D ({shown}). Use class_path em_lightning.optim.MuonWithAdamW (Muon for matrices, AdamW for the "
            "rest), e.g. --config configs/optim/muon.yaml"
        )


@dataclass
class ScheduleSpec:
    """Learning-rate schedule: linear warm-up, then constant, linear or cosine decay to ``min_lr_ratio``·lr.

    Args:
        warmup_steps: optimizer steps of linear warm-up from 0 (takes precedence over ``warmup_ratio``).
        warmup_ratio: warm-up as a fraction of all optimizer steps of the run.
        decay: shape after warm-up.
        min_lr_ratio: final LR as a fraction of the peak (linear/cosine).
    """

    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    decay: Literal["constant", "linear", "cosine"] = "constant"
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        # Checked here, when the config is read: a negative warm-up would run the LR backwards from the first step.
        if self.warmup_steps < 0:
            raise InputError(f"model.schedule.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise InputError(f"model.schedule.warmup_ratio: must be in [0, 1], got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise InputError(f"model.schedule.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")


def lr_lambda(spec: ScheduleSpec, total_steps: int):
    """The LR multiplier as a function of the optimizer step, for ``LambdaLR``."""
    warmup = spec.warmup_steps or int(round(spec.warmup_ratio * total_steps))
    total = max(total_steps, warmup + 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if spec.decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 1.0 - progress if spec.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * shape

    return factor


def build_scheduler(optimizer: Optimizer, spec: ScheduleSpec, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lr_lambda(spec, total_steps))
