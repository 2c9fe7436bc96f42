"""The LightningModule: a causal LM with a LoRA adapter, trained on assistant tokens with any optimiser.

Extension points for callbacks (see ``callbacks/README.md``):
  * :meth:`LoRAFineTune.add_loss_term` — add a differentiable term to the training loss inside ``training_step``;
  * :meth:`LoRAFineTune.save_adapter` — write the adapter as a PEFT dir (vLLM and ``PeftModel`` load it);
  * :meth:`LoRAFineTune.supervised_logits`, :meth:`LoRAFineTune.supervised_logprob_per_row` — logits and
    per-row log-probabilities at a batch's supervised positions, through the module's one forward-path decision
    (``supervised_logits_only``, which the module turns off under FSDP2 for tied-embedding models): callbacks call
    these rather than :mod:`em_lightning.loss` with a flag of their own;
  * :meth:`LoRAFineTune.block_activations` — outputs of chosen decoder blocks (0-based) for one forward, adapter on
    or off; :meth:`LoRAFineTune.adapter_disabled` — the base model's forward (peft's ``disable_adapter()``, no
    second copy); :meth:`LoRAFineTune.decoder_blocks` — the decoder layers;
  * ``self.model`` — the ``peft.PeftModel``; ``self.tokenizer``; :attr:`LoRAFineTune.base_model_dir`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable

from em_lightning.compile import check_speed_options, compile_blocks
from em_lightning.errors import InputError
from em_lightning.lora import LoRASpec, apply_lora, seeded_lora_init
from em_lightning.loss import (
    LOSS_NORMALIZATIONS,
    LossNormalization,
    micro_batch_divisor,
    model_inputs,
    supervised_ce_sum,
)
from em_lightning.loss import supervised_logits as _supervised_logits
from em_lightning.loss import supervised_logprob_per_row as _supervised_logprob_per_row
from em_lightning.mixing import task_ce_sums
from em_lightning.models import TINY_MODELS, ModelSpec, load_model, load_tokenizer, resolve_model_dir
from em_lightning.optim import ScheduleSpec, build_scheduler, check_optimizer_params, optimizer_class
from em_lightning.sharding import FSDPSpec, has_tied_embeddings, load_sharded_lora_model, shard_lora_model

try:  # moving to models.py (one owner per job); either place works
    from em_lightning.models import transformer_blocks
except ImportError:
    from em_lightning.sharding import transformer_blocks

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
        loss_normalization: ``step_tokens`` (default): the mean over all supervised tokens of the optimizer step
            (every micro-batch and rank), so accumulating k micro-batches equals one k times larger batch;
            ``micro_batch``: each micro-batch's own mean, averaged. See :mod:`em_lightning.loss`.
        fsdp: sharding units and mixed precision under the FSDP2 strategy (``configs/strategy/fsdp2.yaml``);
            ignored by other strategies. See :mod:`em_lightning.sharding`.
        loss_chunk_size: run the LM head and loss on at most this many supervised positions at a time (logits
            recomputed in backward), so ``tokens × vocab`` logits never exist at once; None (default): all at
            once. Same loss; needs ``supervised_logits_only``. See :func:`em_lightning.loss.chunked_ce_sum`.
        compile: ``torch.compile`` the transformer blocks in place (checkpoint keys unchanged; a compiled run's
            checkpoint resumes uncompiled and vice versa). See :mod:`em_lightning.compile`.
        Both are off by default, by measurement on CPU (SmolLM2, insecure rows; GPU unmeasured, see
        ``scripts/bench_gpu.py``): chunks of 256 gained no time (-4 % to 0 %) and saved 7 % of peak memory;
        compiling was 6-20 % faster per step with 38 % less memory after ~10 s of compilation, which short runs
        (the quickstart, tests) do not win back, and inductor needs a C compiler. Turn it on for long runs.
    """

    def __init__(
        self,
        base: ModelSpec = ModelSpec(),
        lora: LoRASpec = LoRASpec(),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        schedule: ScheduleSpec = ScheduleSpec(),
        supervised_logits_only: bool = True,
        loss_normalization: LossNormalization = "step_tokens",
        fsdp: FSDPSpec = FSDPSpec(),
        loss_chunk_size: int | None = None,
        compile: bool = False,
    ):
        super().__init__()
        # load_from_checkpoint passes the saved hparams back as plain dicts.
        base = ModelSpec(**base) if isinstance(base, dict) else base
        lora = LoRASpec(**lora) if isinstance(lora, dict) else lora
        schedule = ScheduleSpec(**schedule) if isinstance(schedule, dict) else schedule
        fsdp = FSDPSpec(**fsdp) if isinstance(fsdp, dict) else fsdp
        # Plain dicts only: optimiser classes or dataclasses in hparams break weights_only checkpoint loading.
        # The speed options (loss_chunk_size, compile) change how, not what, is computed: they stay out of the
        # checkpoint's hparams, so a CLI resume keeps this run's values (config.yaml records them).
        self.save_hyperparameters(
            {"base": asdict(base), "lora": asdict(lora), "schedule": asdict(schedule),
             "supervised_logits_only": supervised_logits_only, "loss_normalization": loss_normalization,
             "fsdp": asdict(fsdp)}
        )
        check_speed_options(loss_chunk_size, supervised_logits_only, compile)
        if loss_normalization not in LOSS_NORMALIZATIONS:
            raise InputError(f"model.loss_normalization: {loss_normalization!r} is not one of {LOSS_NORMALIZATIONS}")
        self.base, self.lora, self.schedule = base, lora, schedule
        self.optimizer_factory = optimizer
        self.supervised_logits_only = supervised_logits_only
        self.loss_normalization = loss_normalization
        self.fsdp = fsdp
        self.loss_chunk_size, self.torch_compile = loss_chunk_size, compile  # nn.Module.compile is a method
        self.model = None  # built in configure_model, so strategies (FSDP) can shard it as they build it
        self._tokenizer = None
        self._loss_terms: dict[str, tuple[LossTerm, float | Callable[[int], float]]] = {}
        self._window = [0.0, 0.0, 0.0]  # sums over the current accumulation window (see training_step)
        self._adapter_off_depth = 0  # > 0 inside adapter_disabled()
        # Checkpoints hold the adapter only; on_load_checkpoint checks that every adapter tensor is there.
        self.strict_loading = False

    # ----------------------------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        if self.model is not None:  # idempotent: Lightning may call it more than once
            return
        mesh = self._data_parallel_mesh()
        seed = torch.initial_seed()  # seed_everything's, the same on every rank
        if mesh is not None and self.base.name not in TINY_MODELS:
            # FSDP2 with weights on disk: no rank holds the whole base (see em_lightning.sharding).
            device = self.trainer.strategy.root_device
            model = load_sharded_lora_model(self.base, self.lora, mesh, self.fsdp, device, seed,
                                            self.trainer.precision)
        else:
            model = apply_lora(load_model(self.base), self.lora)
            if self.lora.init_lora_weights:
                seeded_lora_init(model, seed)  # the same adapter however the model was built
            if mesh is not None:  # FSDP2 of a model built in code: shard after LoRA
                model = shard_lora_model(model, mesh, self.fsdp, self.trainer.precision)
        if mesh is not None and has_tied_embeddings(model):
            self.supervised_logits_only = False  # see em_lightning.sharding: the head shares the root unit
        if self.torch_compile:
            compile_blocks(model)
        self.model = model
        # from_pretrained returns eval mode and Lightning keeps sub-module modes: without this, LoRA dropout is off.
        self.model.train()

    def _data_parallel_mesh(self):
        """The data-parallel mesh when the strategy shards the model (FSDP2), else None."""
        try:
            mesh = self.device_mesh  # set by ModelParallelStrategy only
        except (AttributeError, RuntimeError):
            return None
        if mesh is None:
            return None
        return mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh

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
    def add_loss_term(self, name: str, fn: LossTerm, weight: float | Callable[[int], float] = 1.0) -> None:
        """Add ``weight(step) × fn(self)`` to the training loss of every optimizer step.

        ``fn`` returns the raw, differentiable scalar (e.g. the spectral penalty); ``weight`` is a number or a
        function of the optimizer step (a warm-up). The term is evaluated once per optimizer step, on the
        first micro-batch of its accumulation window, and weighted there so the step's gradient is
        ``weight · ∇fn`` whatever ``accumulate_grad_batches`` or the world size (a term of the weights alone is
        the same on every micro-batch and rank). It is summed into the loss ``training_step`` returns: no second
        ``backward``, and precision plugins, DDP and FSDP treat it like the task loss. The module logs
        ``train/<name>`` (raw) and ``train/<name>_coeff``; ``train/loss`` stays the task loss alone.
        """
        if name in self._loss_terms:
            raise ValueError(f"a loss term named {name!r} is already registered")
        self._loss_terms[name] = (fn, weight)

    def remove_loss_term(self, name: str) -> None:
        self._loss_terms.pop(name, None)

    def supervised_logits(self, batch: dict) -> torch.Tensor:
        """Next-token logits at the supervised positions of ``batch``: ``[n_supervised, vocab]`` (row-major, as
        :func:`em_lightning.loss.supervised_logits`), through the forward path training uses. Differentiable;
        wrap in ``torch.no_grad()`` (and :meth:`adapter_disabled` for the base) as needed."""
        return _supervised_logits(self.model, batch, self.supervised_logits_only)

    def supervised_logprob_per_row(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of ``batch``: summed log-probability of its supervised tokens (float32) and their count
        (int64), through the forward path training uses (:func:`em_lightning.loss.supervised_logprob_per_row`)."""
        return _supervised_logprob_per_row(self.model, batch, self.supervised_logits_only)

    def decoder_blocks(self) -> list[torch.nn.Module]:
        """The decoder layers (``model.layers``), in order: index ``i`` is 0-based block ``i``."""
        return transformer_blocks(self.model.get_base_model())

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Inside, forwards are the base model's: peft's ``disable_adapter()`` (the same weights, no second copy).
        :attr:`adapter_active` is False inside (training-time hooks, e.g. steering, stay off for base forwards)."""
        self._adapter_off_depth += 1
        try:
            with self.model.disable_adapter():
                yield
        finally:
            self._adapter_off_depth -= 1

    @property
    def adapter_active(self) -> bool:
        """False inside :meth:`adapter_disabled` (a base forward)."""
        return self._adapter_off_depth == 0

    def block_activations(
        self, batch: dict, layers: Sequence[int], adapter: bool = True
    ) -> dict[int, torch.Tensor]:
        """``{layer: output of decoder block layer}`` (``[rows, seq, hidden]``, 0-based ``layers``) for one forward
        of ``batch`` (its ``input_ids`` and, where present, ``attention_mask`` / ``position_ids``).

        The outputs are caught by forward hooks on the blocks themselves, so they are the residual stream after
        each block (not ``output_hidden_states``, whose last entry is after the final norm). ``adapter=False``
        runs the base model through :meth:`adapter_disabled`. The forward is the decoder alone (no LM head) where
        the model's forward path allows it, else the full forward (FSDP2 with tied embeddings: the embedding is
        gathered by the root unit's forward). Gradients flow when called with grad enabled; the caller picks
        train/eval mode and ``no_grad``. Under DDP/FSDP call it on every rank (sharded forwards are collective).
        """
        blocks = self.decoder_blocks()
        wanted = sorted({int(i) for i in layers})
        bad = [i for i in wanted if not 0 <= i < len(blocks)]
        if bad or not wanted:
            raise InputError(f"layers: {list(layers)} must be 0-based block indices in [0, {len(blocks) - 1}]")
        caught: dict[int, torch.Tensor] = {}

        def catcher(index: int):
            def hook(module, args, output):
                caught[index] = output[0] if isinstance(output, tuple) else output  # a tensor in transformers 5
            return hook

        handles = [blocks[i].register_forward_hook(catcher(i)) for i in wanted]
        try:
            with contextlib.nullcontext() if adapter else self.adapter_disabled():
                if self.supervised_logits_only:
                    self.model.get_base_model().get_decoder()(**model_inputs(batch), use_cache=False)
                else:
                    self.model(**model_inputs(batch), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return {i: caught[i] for i in wanted}

    def save_adapter(self, path: str | Path) -> Path:
        """Write the adapter as a PEFT dir (``adapter_config.json`` + ``adapter_model.safetensors``).

        Collective when distributed: call it on every rank. Under FSDP2 every rank joins the gather of the sharded
        adapter weights (the frozen base is never gathered); global rank zero alone writes the dir.
        """
        path = Path(path)
        trainer = self._trainer
        rank_zero = trainer is None or trainer.is_global_zero
        if self._data_parallel_mesh() is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
            state = get_model_state_dict(self.model, options=options)
            if rank_zero:
                self.model.save_pretrained(str(path), state_dict=state)
        elif rank_zero:
            self.model.save_pretrained(str(path))
        if trainer is not None and trainer.world_size > 1:
            trainer.strategy.barrier("save_adapter")  # the dir exists on every rank's return
        return path

    # -------------------------------------------------------------------------------------------------- steps
    def task_loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Mean next-token cross-entropy over the supervised tokens of ``batch``, and their count."""
        ce_sum, n_tokens = supervised_ce_sum(self.model, batch, self.supervised_logits_only, self.loss_chunk_size)
        return ce_sum / max(n_tokens, 1), n_tokens

    def training_step(self, batch, batch_idx):
        """The task loss normalised as ``loss_normalization`` says (see :mod:`em_lightning.loss`), plus the
        registered loss terms on the first micro-batch of each optimizer step.

        Returns the loss and, for callbacks, ``supervised_tokens`` / ``tokens`` of this micro-batch and
        ``step_end`` (whether the optimizer steps after it).
        """
        k, world = self.trainer.accumulate_grad_batches, self.trainer.world_size
        window_pos = batch.get("window_pos", batch_idx % k)
        step_end = window_pos == batch.get("window_len", k) - 1
        # narrow: (loss sum, tokens) of the batch's narrow rows when data.mix flags mixed rows, else None
        ce_sum, n_tokens, narrow = task_ce_sums(self.model, batch, self.supervised_logits_only, self.loss_chunk_size)
        total = ce_sum / micro_batch_divisor(self.loss_normalization, batch, n_tokens, k, world)
        if window_pos == 0:
            # task-loss sum, supervised tokens (this rank), weighted terms, narrow rows' loss sum and tokens
            self._window = [0.0, 0.0, 0.0, 0.0, 0.0]
            step = self.trainer.global_step
            for name, (fn, weight) in self._loss_terms.items():
                raw = fn(self)
                coeff = float(weight(step) if callable(weight) else weight)
                total = total + (k * coeff) * raw  # Lightning divides by k: the step gets coeff × raw once
                self._window[2] = self._window[2] + coeff * raw.detach()
                self.log(f"train/{name}", raw.detach(), on_step=True, on_epoch=False)
                self.log(f"train/{name}_coeff", coeff, on_step=True, on_epoch=False)
        self._window[0] = self._window[0] + ce_sum.detach()
        self._window[1] += n_tokens
        if narrow is not None:
            self._window[3] = self._window[3] + narrow[0]
            self._window[4] += narrow[1]
        if step_end:
            # The token-weighted mean of the whole step over every rank: one small all-reduce and one host sync.
            window = self._window[:2] + (self._window[3:] if narrow is not None else [])
            sums = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in window])
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum") if world > 1 else sums
            step_loss = sums[0] / sums[1].clamp(min=1)
            self.log("train/loss", step_loss, prog_bar=True, on_step=True, on_epoch=False)
            if self._loss_terms:
                self.log("train/loss_total", step_loss + self._window[2], on_step=True, on_epoch=False)
            if narrow is not None:  # data.mix (em_lightning.mixing)
                self.log("train/loss_narrow", sums[2] / sums[3].clamp(min=1), on_step=True, on_epoch=False)
                self.log("train/mixed_rows", float(batch.get("mixed_rows_used", 0)), on_step=True, on_epoch=False)
        n_input = batch["n_tokens"] if "n_tokens" in batch else batch["attention_mask"].numel()
        return {"loss": total, "supervised_tokens": n_tokens, "tokens": n_input, "step_end": bool(step_end)}

    def validation_step(self, batch, batch_idx):
        loss, n_tokens = self.task_loss(batch)
        # batch_size=n_tokens makes the epoch value the token-weighted mean, like the training objective.
        self.log("val/loss", loss, prog_bar=True, batch_size=max(n_tokens, 1), sync_dist=True)

    def test_step(self, batch, batch_idx):
        loss, n_tokens = self.task_loss(batch)
        self.log("test/loss", loss, batch_size=max(n_tokens, 1), sync_dist=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for _, p in self.trainable_named_parameters() if p.grad is not None]
        if grads:  # before clipping, so a clipped run still shows the raw norm
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            self.log("train/grad_norm", norm)

    # ------------------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        check_optimizer_params(optimizer_class(self.optimizer_factory), named)  # before the call, naming the key
        try:
            optimizer = self.optimizer_factory([p for _, p in named])
        except Exception as err:  # name the config key
            raise InputError(f"model.optimizer: building the optimiser failed: {err}") from err
        scheduler = build_scheduler(optimizer, self.schedule, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, _ in self.trainable_named_parameters()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.model is None:
            return  # the strategy loads after configure_model; nothing to check yet
        saved = checkpoint["state_dict"]
        lora = checkpoint.get("hyper_parameters", {}).get("lora", {})
        was = f" (it was written with model.lora {lora})" if lora else ""
        missing = [n for n, _ in self.trainable_named_parameters() if n not in saved]
        if missing:
            raise CheckpointMismatch(
                f"checkpoint lacks {len(missing)} adapter tensors (e.g. {missing[:2]}){was}: model.lora.target_modules "
                "or model.lora.layers_to_transform differ from the run that wrote it"
            )
        trainable = dict(self.trainable_named_parameters())
        extra = [k for k in saved if k not in trainable]
        if extra:
            raise CheckpointMismatch(
                f"checkpoint holds {len(extra)} adapter tensors this model lacks (e.g. {extra[:2]}){was}: "
                "model.lora.target_modules or model.lora.layers_to_transform differ from the run that wrote it"
            )
        for name, param in trainable.items():
            if tuple(saved[name].shape) != tuple(param.shape):
                raise CheckpointMismatch(
                    f"checkpoint tensor {name} has shape {tuple(saved[name].shape)}, this model's "
                    f"{tuple(param.shape)}{was}: model.lora.r differs from the run that wrote it (this run: "
                    f"r={self.lora.r})"
                )


class CheckpointMismatch(InputError):
    """A checkpoint written with other ``model.lora`` settings; the message names the config key."""
