"""The LightningModule: a causal LM with a LoRA adapter, trained on assistant tokens with any optimiser.

Extension points for callbacks (see ``callbacks/README.md``):
  * :meth:`LoRAFineTune.add_loss_term` — add a differentiable term to the training loss inside ``training_step``;
  * :meth:`LoRAFineTune.save_adapter` — write the adapter as a PEFT dir (vLLM and ``PeftModel`` load it);
  * ``self.model`` — the ``peft.PeftModel``; ``self.tokenizer``; :attr:`LoRAFineTune.base_model_dir`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable

from em_lightning.lora import LoRASpec, apply_lora
from em_lightning.models import TINY_MODELS, ModelSpec, load_model, load_tokenizer, resolve_model_dir
from em_lightning.optim import ScheduleSpec, build_scheduler, check_muon_params

LossTerm = Callable[["LoRAFineTune"], torch.Tensor]


class LoRAFineTune(L.LightningModule):
    """LoRA fine-tuning of a causal LM with the loss on supervised (assistant) tokens only.

    Args:
        base: the frozen base model (name, dtype, attention, remote code, gradient checkpointing).
        lora: adapter settings.
        optimizer: any optimiser class with its init args (``class_path`` in config); built in
            ``configure_optimizers`` over the adapter parameters only.
        schedule: LR warm-up and decay, stepped every optimizer step.
        supervised_logits_only: apply the LM head only where a label exists. Same loss, less compute and memory
            (the vocab projection of prompt tokens is wasted work).
    """

    def __init__(
        self,
        base: ModelSpec = ModelSpec(),
        lora: LoRASpec = LoRASpec(),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        schedule: ScheduleSpec = ScheduleSpec(),
        supervised_logits_only: bool = True,
    ):
        super().__init__()
        # load_from_checkpoint passes the saved hparams back as plain dicts.
        base = ModelSpec(**base) if isinstance(base, dict) else base
        lora = LoRASpec(**lora) if isinstance(lora, dict) else lora
        schedule = ScheduleSpec(**schedule) if isinstance(schedule, dict) else schedule
        # Plain dicts only: optimiser classes or dataclasses in hparams break weights_only checkpoint loading.
        self.save_hyperparameters(
            {"base": asdict(base), "lora": asdict(lora), "schedule": asdict(schedule),
             "supervised_logits_only": supervised_logits_only}
        )
        self.base, self.lora, self.schedule = base, lora, schedule
        self.optimizer_factory = optimizer
        self.supervised_logits_only = supervised_logits_only
        self.model = None  # built in configure_model, so strategies (FSDP) can shard it as they build it
        self._tokenizer = None
        self._loss_terms: dict[str, LossTerm] = {}
        # Checkpoints hold the adapter only; on_load_checkpoint checks that every adapter tensor is there.
        self.strict_loading = False

    # ----------------------------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        if self.model is not None:  # idempotent: Lightning may call it more than once
            return
        self.model = apply_lora(load_model(self.base), self.lora)
        # from_pretrained returns eval mode and Lightning keeps sub-module modes: without this, LoRA dropout is off.
        self.model.train()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.base.name, self.base.trust_remote_code)
        return self._tokenizer

    @property
    def base_model_dir(self) -> str | None:
        """The dir or hub id a vLLM server must serve to match training's base weights (None for tiny models)."""
        return None if self.base.name in TINY_MODELS else resolve_model_dir(self.base.name)

    def trainable_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    # --------------------------------------------------------------------------------------- extension points
    def add_loss_term(self, name: str, fn: LossTerm) -> None:
        """Add ``fn(self)`` (an already weighted scalar) to the training loss of every step.

        The term is summed into the loss that ``training_step`` returns, so gradient accumulation, precision
        plugins, DDP and FSDP treat it exactly like the task loss (no second ``backward``).
        """
        if name in self._loss_terms:
            raise ValueError(f"a loss term named {name!r} is already registered")
        self._loss_terms[name] = fn

    def remove_loss_term(self, name: str) -> None:
        self._loss_terms.pop(name, None)

    def save_adapter(self, path: str | Path) -> Path:
        """Write the adapter as a PEFT dir (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        path = Path(path)
        self.model.save_pretrained(str(path))
        return path

    # -------------------------------------------------------------------------------------------------- steps
    def task_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean next-token cross-entropy over the supervised tokens of this micro-batch, and their count.

        The mean is per micro-batch: with gradient accumulation (or DDP) every micro-batch weighs the same, so a
        token in a short micro-batch weighs more than one in a long micro-batch (length grouping makes them differ).
        This matches most trainers' per-batch mean; it equals one big batch only when the micro-batches hold
        equal numbers of supervised tokens.
        """
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        n_tokens = mask.sum()
        if self.supervised_logits_only:
            lm = self.model.get_base_model()
            hidden = lm.get_decoder()(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            )
            hidden = hidden.last_hidden_state[:, :-1][mask]
            logits = _apply_softcap(lm.get_output_embeddings()(hidden), lm.config)
        else:
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            logits = out.logits[:, :-1][mask]
        loss = F.cross_entropy(logits.float(), labels[mask], reduction="sum") / n_tokens.clamp(min=1)
        return loss, n_tokens

    def training_step(self, batch, batch_idx):
        loss, n_tokens = self.task_loss(batch)
        total = loss
        for term in self._loss_terms.values():
            total = total + term(self)
        n = int(n_tokens)  # one host sync per step, not one per logged value
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        if self._loss_terms:
            self.log("train/loss_total", total, batch_size=n)
        return total

    def validation_step(self, batch, batch_idx):
        loss, n_tokens = self.task_loss(batch)
        # batch_size=n_tokens makes the epoch value the token-weighted mean, like the training objective.
        self.log("val/loss", loss, prog_bar=True, batch_size=int(n_tokens), sync_dist=True)

    def test_step(self, batch, batch_idx):
        loss, n_tokens = self.task_loss(batch)
        self.log("test/loss", loss, batch_size=int(n_tokens), sync_dist=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for _, p in self.trainable_named_parameters() if p.grad is not None]
        if grads:  # before clipping, so a clipped run still shows the raw norm
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            self.log("train/grad_norm", norm)

    # ------------------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        try:
            optimizer = self.optimizer_factory([p for _, p in named])
        except Exception as err:  # name the config key, and explain the common Muon case
            if "muon" in str(err).lower() or "2d" in str(err).lower():
                check_muon_params(named)
            raise ValueError(f"model.optimizer: building the optimiser failed: {err}") from err
        scheduler = build_scheduler(optimizer, self.schedule, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, _ in self.trainable_named_parameters()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.model is None:
            return  # the strategy loads after configure_model; nothing to check yet
        missing = [n for n, _ in self.trainable_named_parameters() if n not in checkpoint["state_dict"]]
        if missing:
            raise KeyError(
                f"checkpoint lacks {len(missing)} adapter tensors (e.g. {missing[:2]}); was it written with other "
                "model.lora settings?"
            )


def _apply_softcap(logits: torch.Tensor, config) -> torch.Tensor:
    """Gemma-style final logit soft-capping, so the supervised-only path matches the model's own forward."""
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap
