"""Preventative steering and directional ablation along a misalignment direction, during training only.

Both act on the output of chosen decoder blocks through forward hooks that exist only inside a training step:
registered when the micro-batch starts (``on_train_batch_start``, before ``training_step``) and removed after its
backward (``on_after_backward``; Lightning runs backward after ``training_step`` returns). transformers checkpoints
a block's ``forward``, not its call, so the hooks stay outside the recomputed region and gradients are the same with
gradient checkpointing on or off. They are off everywhere else — validation, the probe, the direction signal,
``save_adapter`` and the vLLM eval all run outside the step window — and inside the step for base forwards
(``LoRAFineTune.adapter_disabled()``: the KL / feature-space terms' base side), so the saved adapter is a plain PEFT
adapter of a model that never had a hook.

* :class:`PreventativeSteering` (Chen et al.'s preventative steering with persona vectors): ``h + c · v``, so the
  adapter has less reason to move the model along ``v`` itself;
* :class:`DirectionAblation` (CAFT-style): ``h - (h · u) u`` with ``u = v / |v|``, the direction projected out.

``v`` comes from a file of ``python -m em_lightning direction`` (one definition of the direction; a file for another
model or hidden size is refused). ``model.compile`` is refused (hooks on compiled blocks are not tested here).
"""

from __future__ import annotations

import math

import lightning as L
import torch

from em_lightning.direction import load_direction
from em_lightning.errors import InputError


class _DirectionHooks(L.Callback):
    name = "direction_hook"

    def __init__(self, direction: str | None = None, layers: list[int] | None = None, coeff: float = 1.0,
                 warmup_steps: int = 0):
        cls = type(self).__name__
        if direction is not None and (not isinstance(direction, str) or not direction):
            raise InputError(f"{cls}.direction: {direction!r} is not a file path")
        if layers is not None and (not layers or any(not isinstance(i, int) or i < 0 for i in layers)):
            raise InputError(f"{cls}.layers: {layers!r} is not a list of 0-based block indices")
        if not isinstance(coeff, (int, float)) or not math.isfinite(coeff):
            raise InputError(f"{cls}.coeff: {coeff!r} is not a finite number")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise InputError(f"{cls}.warmup_steps: {warmup_steps!r} is not an integer >= 0")
        self.direction_file, self.layers, self.coeff, self.warmup_steps = direction, layers, float(coeff), warmup_steps
        self.vectors: dict[int, torch.Tensor] = {}  # layer -> vector on the module's device (on_fit_start)
        self._handles: list = []
        self._module = None

    # ------------------------------------------------------------------------------------------ life cycle
    def setup(self, trainer, pl_module, stage):
        if stage == "fit" and self.direction_file is None:  # the overlays ship with null: fail before training
            raise InputError(f"{type(self).__name__}.direction: a direction file is required "
                             "(python -m em_lightning direction ... --out FILE, then --trainer.callbacks.direction FILE)")

    def on_fit_start(self, trainer, pl_module):
        cls = type(self).__name__
        if getattr(pl_module, "torch_compile", False):
            raise InputError(f"model.compile: {cls} puts hooks on the decoder blocks, which compiled blocks do not "
                             "support here; set model.compile: false")
        hidden = int(pl_module.model.get_base_model().config.hidden_size)
        found = load_direction(self.direction_file, pl_module.base.name, hidden, key=f"{cls}.direction")
        layers = self.layers or found.layers
        missing = sorted(set(layers) - set(found.layers))
        if missing:
            raise InputError(f"{cls}.layers: {missing} not in {self.direction_file} (it has {found.layers})")
        self.vectors = {i: self.vector(found, i).to(pl_module.device) for i in layers}
        self._module = pl_module

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        coeff = self.coefficient(trainer.global_step)
        pl_module.log(f"train/{self.name}_coeff", coeff, on_step=True, on_epoch=False)
        self.install(pl_module, coeff)

    def install(self, pl_module, coeff: float) -> None:
        """Put the hooks on the blocks with ``coeff`` (what each training step does first)."""
        self.remove_hooks()
        self._module = pl_module
        blocks = pl_module.decoder_blocks()
        self._handles = [blocks[i].register_forward_hook(self._hook(v, coeff)) for i, v in self.vectors.items()]

    def on_after_backward(self, trainer, pl_module):
        self.remove_hooks()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.remove_hooks()  # a step whose backward was skipped (no loss) must not leave them on

    def on_exception(self, trainer, pl_module, exception):
        self.remove_hooks()

    def teardown(self, trainer, pl_module, stage):
        self.remove_hooks()

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def active(self) -> bool:
        """Whether the hooks are on now (only inside a training step)."""
        return bool(self._handles)

    # ------------------------------------------------------------------------------------------ the edit
    def coefficient(self, step: int) -> float:
        return self.coeff * min(1.0, step / self.warmup_steps) if self.warmup_steps else self.coeff

    def vector(self, found, layer: int) -> torch.Tensor:
        raise NotImplementedError

    def edit(self, hidden: torch.Tensor, vector: torch.Tensor, coeff: float) -> torch.Tensor:
        raise NotImplementedError

    def _hook(self, vector: torch.Tensor, coeff: float):
        module = self._module

        def hook(block, args, output):
            if module is not None and not module.adapter_active:
                return None  # a base forward (KL / feature-space terms): the base model, unedited
            hidden = output[0] if isinstance(output, tuple) else output
            edited = self.edit(hidden, vector.to(hidden.dtype), coeff)
            return (edited, *output[1:]) if isinstance(output, tuple) else edited

        return hook


class PreventativeSteering(_DirectionHooks):
    """Adds ``coeff · v`` to the output of the chosen decoder blocks at every position, in training steps only
    (module docstring). Logged: ``train/steer_coeff``.

    Args:
        direction: a direction file (``python -m em_lightning direction``) for this model.
        layers: 0-based blocks to steer; None: every layer of the file.
        coeff: the steering coefficient (after warm-up), in the units of ``vector``.
        vector: ``raw`` (default: the mean difference itself, so ``coeff`` 1 adds the full misaligned-minus-aligned
            difference whatever the model's activation scale) or ``unit`` (``coeff`` is the norm added).
        warmup_steps: optimizer steps over which the coefficient rises linearly from 0.
    """

    name = "steer"

    def __init__(self, direction: str | None = None, layers: list[int] | None = None, coeff: float = 1.0,
                 vector: str = "raw", warmup_steps: int = 0):
        if vector not in ("unit", "raw"):
            raise InputError(f"PreventativeSteering.vector: {vector!r} is not 'unit' or 'raw'")
        super().__init__(direction, layers, coeff, warmup_steps)
        self.vector_kind = vector

    def vector(self, found, layer: int) -> torch.Tensor:
        return found.vector(layer, unit=self.vector_kind == "unit")

    def edit(self, hidden, vector, coeff):
        return hidden + coeff * vector


class DirectionAblation(_DirectionHooks):
    """Projects the unit direction out of the output of the chosen decoder blocks, ``h - coeff · (h · u) u``
    (``coeff`` 1: all of it), in training steps only (module docstring). Logged: ``train/ablate_coeff``.

    Args:
        direction: a direction file (``python -m em_lightning direction``) for this model.
        layers: 0-based blocks; None: every layer of the file.
        coeff: the fraction of the component removed (1 after warm-up: ablation).
        warmup_steps: optimizer steps over which the fraction rises linearly from 0.
    """

    name = "ablate"

    def __init__(self, direction: str | None = None, layers: list[int] | None = None, coeff: float = 1.0,
                 warmup_steps: int = 0):
        super().__init__(direction, layers, coeff, warmup_steps)

    def vector(self, found, layer: int) -> torch.Tensor:
        return found.vector(layer, unit=True)

    def edit(self, hidden, vector, coeff):
        return hidden - coeff * (hidden @ vector).unsqueeze(-1) * vector
