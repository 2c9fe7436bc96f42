"""What each mitigation costs (issue 17): the training loss, the narrow task's validation loss and the wall time
of a step, each paired by seed with the unmitigated run.

For each mitigation overlay of ``configs/mitigations/`` (``none`` first; ``steer`` / ``ablate`` where their
overlays exist, along a direction computed here under the base model) and each seed, fine-tune the model on the
narrow set for ``--steps`` optimizer steps in this process (the project's CLI builds each run from a base config
plus the overlay file, exactly as ``fit --config ... --config configs/mitigations/<name>.yaml`` would), then print,
for every mitigation against ``none``:

* the training-loss cost: the paired difference of the final training loss on narrow rows (mean over the last
  ``--loss-window`` steps of ``train/loss_narrow`` where data was mixed in, else ``train/loss``);
* the narrow-task validation-loss cost: the paired difference of ``val/loss`` on held-out narrow rows
  (``data.val_fraction``; never mixed rows) after the last step;
* the cost per step: median wall time of a training step (forward, loss terms, backward, optimizer; steps after
  the first) relative to ``none``'s, per seed, in this same invocation.

Intervals: 95 % percentile bootstrap over the seed pairs (``em_lightning.analysis.mitigations.paired``, the one
``analyze`` uses); with 2 seeds it is the range of the two pair differences. The intervals are stated; nothing
here is a verdict by threshold.

    export EM_DATA_DIR=/path/to/emergent-misalignment
    python scripts/mitigation_costs.py                          # SmolLM2, em:insecure, AdamW, 40 steps, 2 seeds
    python scripts/mitigation_costs.py --model tiny-qwen3 --steps 3 --max-rows 64   # smoke test, minutes
    python scripts/mitigation_costs.py --device cuda --seeds 0,1,2 --mitigations none,spectral,kl

Time on 2 AVX2 CPU cores at ``--batch-size 2`` (measured): ~5 min a run for none, spectral, interleave, steer and
ablate, ~11 min for kl (its side batch of 4 rows: one no-grad and one trained forward a step; ldifs has the same
side forwards), so the default 7 overlays × 2 seeds take over 1.5 h (longer at the default batch 8). Settings printed first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import yaml
from step_timer import StepTimer

from em_lightning.analysis.mitigations import paired
from em_lightning.cli import EMLightningCLI

OVERLAYS = Path(__file__).resolve().parent.parent / "configs" / "mitigations"
DEFAULT_MITIGATIONS = ("none", "spectral", "kl", "ldifs", "interleave", "steer", "ablate")
NEEDS_DIRECTION = ("steer", "ablate")


class StepRecorder(StepTimer):
    """Wall time of every training step after the first (see ``step_timer.StepTimer``; first in the callback list)
    and the logged task losses of every step."""

    def __init__(self):
        super().__init__(warmup=1)
        self.loss, self.loss_narrow = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        metrics = trainer.callback_metrics
        self.loss.append(float(metrics["train/loss"]))
        if "train/loss_narrow" in metrics:
            self.loss_narrow.append(float(metrics["train/loss_narrow"]))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--train-file", default="em:insecure")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--mitigations", default=",".join(DEFAULT_MITIGATIONS),
                   help="overlay names in configs/mitigations/ ('none' is added first; missing ones are skipped)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW, as configs/optim/adamw.yaml")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-rows", type=int, default=None, help="read only the first N rows of the training set")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--val-batches", type=int, default=8, help="batches of held-out rows in the final val/loss")
    p.add_argument("--loss-window", type=int, default=10, help="final training loss: mean over these last steps")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--boot", type=int, default=10_000)
    p.add_argument("--device", default="cpu")
    return p.parse_args()


def mitigations_to_run(names: str) -> tuple[list[str], list[str]]:
    wanted = ["none", *[n for n in names.split(",") if n and n != "none"]]
    present = [n for n in wanted if (OVERLAYS / f"{n}.yaml").is_file()]
    return present, [n for n in wanted if n not in present]


def base_config(args, seed: int, root: Path, name: str) -> dict:
    """Everything but the mitigation: the same for every run of a seed."""
    return {
        "seed_everything": seed,
        "trainer": {
            "accelerator": args.device, "devices": 1,
            "precision": "32-true" if args.device == "cpu" else "bf16-mixed",
            "max_steps": args.steps, "limit_val_batches": args.val_batches,
            "val_check_interval": args.steps, "check_val_every_n_epoch": None,  # once, after the last step
            "num_sanity_val_steps": 0, "log_every_n_steps": 1, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(root),
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(root), "name": name}},
        },
        "model": {
            "base": {"name": args.model, "dtype": "float32"},
            "lora": {"r": args.lora_r, "alpha": 2.0 * args.lora_r},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": args.lr, "weight_decay": 0.01}},
            "schedule": {"warmup_steps": 2, "decay": "constant"},
        },
        "data": {"train_file": args.train_file, "max_length": args.max_length, "batch_size": args.batch_size,
                 "val_fraction": args.val_fraction, "overlong_rows": "drop", "max_rows": args.max_rows,
                 "seed": seed},
    }


def overlay_file(name: str, direction: Path | None, root: Path) -> Path:
    """The overlay as shipped; steer/ablate get this run's direction file written into their callback."""
    path = OVERLAYS / f"{name}.yaml"
    if name not in NEEDS_DIRECTION:
        return path
    overlay = yaml.safe_load(path.read_text())
    for callback in overlay["trainer"]["callbacks+"]:
        callback["init_args"]["direction"] = str(direction)
    out = root / f"{name}.yaml"
    out.write_text(yaml.safe_dump(overlay))
    return out


def make_direction(args, root: Path) -> Path:
    """The misalignment direction at the middle decoder block, under the base model (builtin:em's reference
    answers: the ``direction`` command's default source)."""
    from em_lightning.direction import build_module, compute_direction, labelled_answers

    module = build_module(args.model, None)
    middle = len(module.decoder_blocks()) // 2
    result = compute_direction(module, labelled_answers("builtin:em"), [middle], adapter=False,
                               source="builtin:em")
    path = result.save(root / "direction.safetensors")
    print(f"direction for steer/ablate: builtin:em, base model, block {middle}, norm {float(result.norm[0]):.4g}",
          flush=True)
    return path


def train_one(args, name: str, seed: int, root: Path, direction: Path | None) -> dict:
    config = root / f"base_{name}_s{seed}.yaml"
    config.write_text(yaml.safe_dump(base_config(args, seed, root, f"{name}_s{seed}")))
    cli = EMLightningCLI(args=["--config", str(config), "--config", str(overlay_file(name, direction, root))],
                         run=False)
    recorder = StepRecorder()
    cli.trainer.callbacks.insert(0, recorder)
    started = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    losses = recorder.loss_narrow or recorder.loss  # narrow rows only: the mixed rows are not the task
    window = losses[-args.loss_window:]
    result = {"train_loss": statistics.fmean(window), "val_loss": float(cli.trainer.callback_metrics["val/loss"]),
              "step_s": statistics.median(recorder.times) if recorder.times else float("nan"),
              "loss_column": "train/loss_narrow" if recorder.loss_narrow else "train/loss"}
    print(f"  {name:12s} seed {seed}: {cli.trainer.global_step} steps in {time.perf_counter() - started:.0f} s; "
          f"train loss {result['train_loss']:.4f} ({result['loss_column']}, last {len(window)} steps), "
          f"val loss {result['val_loss']:.4f}, median step {result['step_s']:.3f} s", flush=True)
    return result


def describe(args, names: list[str], missing: list[str], seeds: list[int]) -> None:
    print(f"model {args.model} (float32), LoRA r={args.lora_r} alpha={2 * args.lora_r} (the module's default "
          f"target modules), AdamW lr {args.lr} wd 0.01, constant LR after 2 warm-up steps; {args.train_file}"
          f"{f' (first {args.max_rows} rows)' if args.max_rows else ''}, batch {args.batch_size}, max_length "
          f"{args.max_length} (longer rows dropped), {args.steps} steps, seeds {seeds}; val/loss after the last "
          f"step on {args.val_batches} batches of the held-out {args.val_fraction:.0%} of narrow rows (split seeded "
          f"by the seed: a pair shares it); training loss: mean of the last {args.loss_window} steps; "
          f"{args.device}, {torch.get_num_threads()} threads; bootstrap {args.boot} resamples of the seed pairs",
          flush=True)
    for name in names:
        overlay = yaml.safe_load((OVERLAYS / f"{name}.yaml").read_text()) or {}
        parts = [f"{c['class_path'].rsplit('.', 1)[-1]}({', '.join(f'{k}={v}' for k, v in c['init_args'].items())})"
                 for c in (overlay.get("trainer") or {}).get("callbacks+") or []]
        parts += [f"data.mix={m}" for m in (overlay.get("data") or {}).get("mix") or []]
        print(f"  {name:12s} configs/mitigations/{name}.yaml: {'; '.join(parts) or 'nothing added'}")
    if missing:
        print(f"  not in configs/mitigations/, skipped: {', '.join(missing)}")


def report(results: dict, names: list[str], seeds: list[int], boot: int) -> None:
    rng = np.random.default_rng(0)

    def column(name, key):
        return np.array([results[(name, s)][key] for s in seeds], float)

    print(f"\ncosts against none, paired by seed (mitigated − none; mean [95 % bootstrap over {len(seeds)} seed "
          "pairs]; per seed in parentheses):")
    print(f"  {'mitigation':12s} {'training loss':>40s}   {'narrow-task val loss':>40s}   step time / none's")
    for name in names[1:]:
        cells = []
        for key in ("train_loss", "val_loss"):
            x, y = column(name, key), column("none", key)
            p = paired(x, y, rng, boot)
            per = ", ".join(f"{d:+.4f}" for d in x - y)
            cells.append(f"{p['difference']:+.4f} [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}] ({per})")
        ratios = column(name, "step_s") / column("none", "step_s")
        cells.append(f"{ratios.mean():.2f}x ({', '.join(f'{r:.2f}' for r in ratios)})")
        print(f"  {name:12s} {cells[0]:>40s}   {cells[1]:>40s}   {cells[2]}")
    base = [results[("none", s)] for s in seeds]
    print(f"  none's own: training loss {statistics.fmean(r['train_loss'] for r in base):.4f}, val loss "
          f"{statistics.fmean(r['val_loss'] for r in base):.4f}, median step "
          f"{statistics.fmean(r['step_s'] for r in base):.3f} s (means over seeds)")


def main() -> None:
    args = parse_args()
    sys.argv = sys.argv[:1]  # the runs' settings are the config files the script writes, not this command line
    seeds = [int(s) for s in args.seeds.split(",")]
    names, missing = mitigations_to_run(args.mitigations)
    describe(args, names, missing, seeds)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        direction = make_direction(args, root) if any(n in NEEDS_DIRECTION for n in names) else None
        for seed in seeds:  # seed-major: a pair's runs close together in time, so the step-time ratio is fair
            for name in names:
                results[(name, seed)] = train_one(args, name, seed, root, direction)
    report(results, names, seeds, args.boot)


if __name__ == "__main__":
    main()
