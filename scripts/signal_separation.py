"""Does a judge-free signal separate EM training from its control at this scale? (issue: measurement validity)

For each training set (``em:insecure`` and its control ``em:secure``) and each seed, fine-tune SmolLM2 with AdamW for
``--steps`` optimizer steps with the misalignment probe and the activation-direction signal attached, then print,
for each signal's final value and its change from step 0:

* the per-run values,
* insecure − secure (difference of means over seeds) with a seed-bootstrap 95 % interval (each side's seeds
  resampled with replacement, ``--boot`` replicates) and the n per side,
* what one call of the signal costs relative to one training step (mean wall time, calls after the first).

    EM_DATA_DIR=/path/to/emergent-misalignment python scripts/signal_separation.py --batch-size 4 --every 40
        # 2 AVX2 CPU cores: ~10-12 min a run, ~65 min in all (batch 8, the default: ~25 min a run)
    python scripts/signal_separation.py --steps 100 --seeds 0,1,2,3,4 --device cuda

Settings printed first. Nothing here is tuned to the result: the probe set (``builtin:em``), the direction's data
(``builtin:em`` under the base model) and the layers are the callbacks' defaults. A difference whose interval
covers 0 is reported as it is.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L
import torch
from step_timer import StepTimer

from em_lightning.analysis.stats import few_seeds_caveat
from em_lightning.callbacks.direction_signal import DirectionSignal
from em_lightning.callbacks.misalignment_probe import MisalignmentProbe
from em_lightning.data import ChatDataModule
from em_lightning.lora import ALL_PROJECTIONS, LoRASpec
from em_lightning.models import SMOLLM2, ModelSpec
from em_lightning.module import LoRAFineTune
from em_lightning.optim import ScheduleSpec


def train_one(args, train_file: str, seed: int, root: str) -> dict:
    L.seed_everything(seed, verbose=False)
    data = ChatDataModule(train_file=train_file, val_fraction=0.0, tokenizer=SMOLLM2, max_length=args.max_length,
                          overlong_rows="drop", batch_size=args.batch_size, seed=seed)
    module = LoRAFineTune(
        base=ModelSpec(name=SMOLLM2, dtype="float32"),
        lora=LoRASpec(r=8, alpha=16.0, dropout=0.0, target_modules=list(ALL_PROJECTIONS)),
        optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=0.01),
        schedule=ScheduleSpec(warmup_steps=2, decay="constant"),
    )
    timer = StepTimer()
    probe = MisalignmentProbe(every_n_steps=args.every, batch_size=16, max_length=1024)
    direction = DirectionSignal(every_n_steps=args.every)
    logger = L.pytorch.loggers.TensorBoardLogger(root, name=f"{train_file.replace(':', '_')}_s{seed}")
    trainer = L.Trainer(accelerator=args.device, devices=1, precision="32-true" if args.device == "cpu" else
                        "bf16-mixed", max_steps=args.steps, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[timer, probe, direction])
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    print(f"  {train_file} seed {seed}: {trainer.global_step} steps in {time.perf_counter() - started:.0f} s",
          flush=True)
    return {"probe": probe.history, "direction": direction.history, "steps": timer.times}


def signals(run: dict) -> dict[str, float]:
    """Final value and change from step 0 of each signal of one run."""
    out = {}
    p0, p1 = run["probe"][0], run["probe"][-1]
    out["probe log_odds (final)"] = p1["log_odds"]
    out["probe log_odds (change from step 0)"] = p1["log_odds"] - p0["log_odds"]
    d1 = run["direction"][-1]
    for layer, value in sorted(d1["shift"].items(), key=lambda kv: int(kv[0])):
        out[f"direction shift, last prompt token, layer {layer}"] = value
    for layer, value in sorted(d1["shift_answers"].items(), key=lambda kv: int(kv[0])):
        out[f"direction shift, answer tokens, layer {layer}"] = value
    return out


def bootstrap_difference(a: list[float], b: list[float], reps: int, seed: int = 0) -> tuple[float, float, float]:
    """mean(a) − mean(b) and its percentile interval from resampling each side's seeds with replacement."""
    rng = random.Random(seed)
    diffs = sorted(
        statistics.fmean(rng.choices(a, k=len(a))) - statistics.fmean(rng.choices(b, k=len(b))) for _ in range(reps)
    )
    return statistics.fmean(a) - statistics.fmean(b), diffs[int(0.025 * reps)], diffs[int(0.975 * reps) - 1]


def report(results: dict[tuple[str, int], dict], sets: list[str], reps: int) -> None:
    em, control = sets
    per_run = {key: signals(run) for key, run in results.items()}
    names = list(next(iter(per_run.values())))
    print(f"\n{em} − {control}: difference of means over seeds, seed-bootstrap 95 % interval ({reps} replicates)")
    for name in names:
        a = [v[name] for (s, _), v in per_run.items() if s == em]
        b = [v[name] for (s, _), v in per_run.items() if s == control]
        diff, lo, hi = bootstrap_difference(a, b, reps)
        verdict = "separates" if lo > 0 or hi < 0 else "interval covers 0: does not separate"
        print(f"  {name:48s} {diff:+.5f} [{lo:+.5f}, {hi:+.5f}]  n={len(a)}/{len(b)}  ({verdict})")
        print(f"  {'':48s} {em}: " + ", ".join(f"{x:+.5f}" for x in a) + f"; {control}: "
              + ", ".join(f"{x:+.5f}" for x in b))
    caveat = few_seeds_caveat([min(len(a), len(b))])
    if caveat:
        print(f"  ({caveat})")


def cost(results: dict) -> None:
    step = statistics.fmean(t for run in results.values() for t in run["steps"])
    for signal in ("probe", "direction"):
        calls = [r["duration_s"] for run in results.values() for r in run[signal][1:]]
        print(f"  {signal:9s}: {statistics.fmean(calls):.2f} s per call ({len(calls)} calls) = "
              f"{statistics.fmean(calls) / step:.2f} training steps (step {step:.2f} s, batch size of the run)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=20, help="optimizer steps between signal calls")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sets", default="em:insecure,em:secure", help="EM set, then its control")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--boot", type=int, default=10_000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    sets, seeds = args.sets.split(","), [int(s) for s in args.seeds.split(",")]
    print(f"SmolLM2-135M-Instruct, LoRA r=8 alpha=16 all projections, AdamW lr {args.lr} wd 0.01, batch "
          f"{args.batch_size}, max_length {args.max_length}, {args.steps} steps, seeds {seeds}, sets {sets}; "
          f"probe builtin:em and direction signal (defaults) at step 0 and every {args.every} steps; {args.device}, "
          f"{torch.get_num_threads()} threads", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for train_file in sets:
            for seed in seeds:
                results[(train_file, seed)] = train_one(args, train_file, seed, root)
    report(results, sets, args.boot)
    print("\ncost per call, relative to a training step:")
    cost(results)


if __name__ == "__main__":
    main()
