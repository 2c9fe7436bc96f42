"""The adapter's activation shift along the misalignment direction, every few steps (see
:mod:`em_lightning.direction`)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import torch

from em_lightning import rundir
from em_lightning.batching import ChatCollator
from em_lightning.direction import (
    Direction,
    batches_of,
    compute_direction,
    iter_block_outputs,
    load_direction,
    probe_answers,
)
from em_lightning.errors import InputError
from em_lightning.probe import load_probe_set


class DirectionSignal(L.Callback):
    """Every ``every_n_steps`` optimizer steps, at the start (step 0) and at the end, the projection of the
    activation shift onto the unit misalignment direction v of each layer,

        (h_adapted - h_base) · v

    averaged over a fixed prompt set: at the last prompt token of each question rendered with the generation
    prompt (``direction/shift/<layer>``), and over the assistant tokens of the set's reference answers (each
    answer's token mean, then the mean over answers: ``direction/shift_answers/<layer>``). h_base comes from the
    same model with the adapter disabled (``LoRAFineTune.block_activations(adapter=False)``, no second copy); the
    base side never changes during a fit, so its projections are computed once, at the first call, and each later
    call costs one no-grad forward of the prompts and the answers with the adapter on. Exactly 0 while every LoRA
    B is 0.

    Cost (measured with SmolLM2-135M shapes, builtin:em: 10 prompts + 80 answers, batch 16, fp32): a call takes
    about 3 training steps of 8 rows (641 tokens, forward + backward + AdamW) on an H100 (0.59 s vs 0.19 s) and
    on 16 CPU cores (2.9 s vs 0.97 s); the first call, which also runs the base side, about 6-7 steps, and
    computing the direction at the start 2.5 (CPU) to 5 (H100: 0.93 s) steps. At ``every_n_steps: 10`` that is ~30 % more
    time; use a larger N (or fewer ``prompts``) on long runs.

    Logs to every logger at the step (plus ``direction/duration_s``) and one JSON line per call to
    ``<run dir>/<jsonl>`` (``direction.jsonl``)::

        {"step": 10, "layers": [1], "shift": {"1": 0.012}, "shift_answers": {"1": 0.020}, "duration_s": 0.3,
         "n_prompts": 10, "n_answers": 80, "direction": {"model": ..., "source": ..., "source_sha256": ..., ...}}

    The direction: ``direction`` (a file from ``python -m em_lightning direction``; refused when computed for
    another model or hidden size), or else computed when training starts from ``source``'s reference answers
    (default ``builtin:em``) under the base model (adapter disabled), at ``layers``. Runs in the trainer's thread
    with every module in eval mode (dropout off) under ``torch.no_grad()``; each module's train/eval flag and
    every ``.grad`` are left as found. Under DDP/FSDP every rank runs the forwards (sharded forwards are
    collective) and rank zero logs and writes; the run dir is resolved in ``setup`` on every rank.

    Args:
        direction: a direction file; None: compute it from ``source`` under the base model at the start of fit.
        source: probe set whose reference answers define the direction (when ``direction`` is None).
        layers: 0-based decoder blocks; None: those of the ``direction`` file, or the middle block.
        prompts: probe set whose questions (last prompt token) and reference answers (answer tokens) are
            measured.
        every_n_steps: optimizer steps between calls.
        batch_size: conversations per forward.
        max_length: longest conversation in tokens (a longer one is an error).
        log_at_start: also measure before the first update (0 for a fresh adapter).
        log_at_end: also measure when training ends, if that step was not just measured.
        jsonl: file name in the run dir; None: no file.
    """

    def __init__(
        self,
        direction: str | None = None,
        source: str = "builtin:em",
        layers: list[int] | None = None,
        prompts: str = "builtin:em",
        every_n_steps: int = 10,
        batch_size: int = 16,
        max_length: int = 2048,
        log_at_start: bool = True,
        log_at_end: bool = True,
        jsonl: str | None = rundir.DIRECTION,
    ):
        for key, ok in (
            ("every_n_steps", isinstance(every_n_steps, int) and every_n_steps >= 1),
            ("batch_size", isinstance(batch_size, int) and batch_size >= 1),
            ("max_length", isinstance(max_length, int) and max_length >= 2),
            ("layers", layers is None or (len(layers) > 0 and all(isinstance(i, int) and i >= 0 for i in layers))),
        ):
            if not ok:
                raise InputError(f"DirectionSignal.{key}: invalid value {locals()[key]!r}")
        self.direction_file, self.source, self.layers, self.prompts = direction, source, layers, prompts
        self.every_n_steps, self.batch_size, self.max_length = every_n_steps, batch_size, max_length
        self.log_at_start, self.log_at_end, self.jsonl = log_at_start, log_at_end, jsonl
        self.direction: Direction | None = None
        self.history: list[dict] = []  # this fit's records (every rank), for tests and scripts
        self.run_dir: Path | None = None
        self._prompt_batches: list[dict] = []
        self._answer_batches: list[dict] = []
        self._base: dict[str, dict[int, torch.Tensor]] | None = None  # the base model's projections, per kind
        self._last_step: int | None = None

    # ------------------------------------------------------------------------------------------ life cycle
    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        self._last_step, self.history, self._base, self.direction = None, [], None, None
        self.run_dir = rundir.resolve_run_dir(trainer) if trainer is not None else None  # every rank
        tok = pl_module.tokenizer
        try:  # every rank, before training: a bad file fails naming it
            entries = load_probe_set(self.prompts)
            answers = probe_answers(self.prompts)
            if self.direction_file is None:
                probe_answers(self.source)
        except InputError as err:
            raise InputError(f"DirectionSignal.prompts / source: {err}") from None
        collate = ChatCollator(tok.pad_token_id)
        items = []
        for e in entries:
            ids = tok.apply_chat_template(e.messages("")[:-1], tokenize=True, add_generation_prompt=True,
                                          return_dict=False)
            ids = torch.tensor(ids, dtype=torch.long)
            items.append({"input_ids": ids, "labels": torch.full_like(ids, -100)})
        self._prompt_batches = [collate(items[lo : lo + self.batch_size])
                                for lo in range(0, len(items), self.batch_size)]
        rows = answers.rows["aligned"] + answers.rows["misaligned"]
        self._answer_batches = batches_of(rows, tok, self.batch_size, self.max_length, "DirectionSignal.prompts")
        self.n_prompts, self.n_answers = len(items), len(rows)

    def on_train_start(self, trainer, pl_module):
        self.direction = self._direction(trainer, pl_module)  # every rank (collective forwards)
        if self.log_at_start and trainer.global_step != self._last_step:
            self.measure(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == 0 or step == self._last_step or step % self.every_n_steps:
            return
        self.measure(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.log_at_end and trainer.global_step != self._last_step:
            self.measure(trainer, pl_module)

    def state_dict(self):
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict):
        self._last_step = state_dict.get("last_step")

    # ------------------------------------------------------------------------------------------ the signal
    def _direction(self, trainer, pl_module) -> Direction:
        n_blocks = len(pl_module.decoder_blocks())
        hidden = int(pl_module.model.get_base_model().config.hidden_size)
        if self.direction_file is not None:
            found = load_direction(self.direction_file, pl_module.base.name, hidden, key="DirectionSignal.direction")
            missing = sorted(set(self.layers or []) - set(found.layers))
            if missing:
                raise InputError(f"DirectionSignal.layers: {missing} not in {self.direction_file} ({found.layers})")
            layers = self.layers or found.layers
            keep = [found.layers.index(i) for i in layers]
            return Direction(list(layers), found.diff[keep], found.metadata)
        layers = self.layers if self.layers is not None else [n_blocks // 2]
        bad = [i for i in layers if i >= n_blocks]
        if bad:
            raise InputError(f"DirectionSignal.layers: {bad} out of range; the model has blocks 0..{n_blocks - 1}")
        context = trainer.precision_plugin.forward_context()
        return compute_direction(pl_module, probe_answers(self.source), layers, adapter=False,
                                 batch_size=self.batch_size, max_length=self.max_length, context=context,
                                 source=self.source)

    def projections(self, trainer, pl_module, adapter: bool) -> dict[str, dict[int, torch.Tensor]]:
        """Per kind (``last``: each prompt's last token; ``answers``: each answer's token mean) and layer, the
        projection onto the unit direction, one value per prompt / answer (float64, on the module's device)."""
        layers = self.direction.layers
        units = {i: self.direction.vector(i).to(pl_module.device) for i in layers}
        out: dict[str, dict[int, list[torch.Tensor]]] = {"last": {i: [] for i in layers},
                                                          "answers": {i: [] for i in layers}}
        context = trainer.precision_plugin.forward_context()
        for kind, batches in (("last", self._prompt_batches), ("answers", self._answer_batches)):
            for batch, acts in iter_block_outputs(pl_module, batches, layers, adapter, context):
                for i in layers:
                    proj = acts[i].float() @ units[i]  # [rows, seq]
                    if kind == "last":
                        last = batch["attention_mask"].sum(1) - 1  # right padding: the last real token
                        value = proj.gather(1, last.unsqueeze(1))[:, 0]
                    else:
                        mask = (batch["labels"] != -100).float()
                        value = (proj * mask).sum(1) / mask.sum(1).clamp(min=1)
                    out[kind][i].append(value.double())
        return {kind: {i: torch.cat(v) for i, v in per.items()} for kind, per in out.items()}

    def measure(self, trainer, pl_module) -> dict:
        """Measure now (every rank), log and write at ``trainer.global_step`` (rank zero)."""
        step = trainer.global_step
        self._last_step = step
        started = time.perf_counter()
        if self._base is None:  # the base never changes during a fit: its side once
            self._base = self.projections(trainer, pl_module, adapter=False)
        adapted = self.projections(trainer, pl_module, adapter=True)
        means = torch.stack([(adapted[kind][i] - self._base[kind][i]).mean()
                             for kind in ("last", "answers") for i in self.direction.layers]).cpu().tolist()
        n = len(self.direction.layers)
        shift = dict(zip(map(str, self.direction.layers), means[:n]))
        shift_answers = dict(zip(map(str, self.direction.layers), means[n:]))
        duration = time.perf_counter() - started
        record = {"step": step, "layers": self.direction.layers, "shift": shift, "shift_answers": shift_answers,
                  "duration_s": duration, "n_prompts": self.n_prompts, "n_answers": self.n_answers,
                  "direction": self.direction.metadata}
        self.history.append(record)
        if trainer.is_global_zero:  # nothing collective below: the run dir was resolved in setup
            metrics = {f"direction/shift/{i}": v for i, v in shift.items()}
            metrics.update({f"direction/shift_answers/{i}": v for i, v in shift_answers.items()})
            metrics["direction/duration_s"] = duration
            metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            if self.jsonl and self.run_dir is not None:
                rundir.append_jsonl(self.run_dir / self.jsonl, [record])
        return record
