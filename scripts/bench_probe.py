"""The misalignment probe on SmolLM2: what one probe call costs against a training step, and how far
``probe/log_odds`` moves in a short run on ``insecure.jsonl`` next to the same run on ``secure.jsonl`` (the EM
paper's control).

    EM_DATA_DIR=/path/to/emergent-misalignment python scripts/bench_probe.py   # CPU: ~5-10 min on 2 cores
    python scripts/bench_probe.py --device cuda --steps 100

Both runs: SmolLM2-135M-Instruct, LoRA r=8 alpha=16 on all seven projections, AdamW (lr 1e-4 and weight decay
0.01 as in ``configs/optim/adamw.yaml``; ``--lr`` to change), constant LR after 2 warm-up steps, batch 8, max
length 256 (rows whose prompt fills it are dropped), the same seed, ``--steps`` optimizer steps; the probe
(``builtin:em``, 10 questions × 8 answers, batch 16) at step 0 and every ``--every`` steps. Printed: the
probe's log-odds (and misaligned probability, and each side's mean log-probability) at every probed step of
both runs, the shift from step 0, how each question moved, and the cost: mean wall time of a probe call (calls
after the first) against a training step (forward + backward + optimizer, steps after the first), and their
ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L
import torch
from step_timer import StepTimer

from em_lightning.callbacks.misalignment_probe import MisalignmentProbe
from em_lightning.data import ChatDataModule
from em_lightning.lora import ALL_PROJECTIONS, LoRASpec
from em_lightning.models import SMOLLM2, ModelSpec
from em_lightning.module import LoRAFineTune
from em_lightning.optim import ScheduleSpec


def run(args, train_file: str, root: str) -> tuple[MisalignmentProbe, StepTimer]:
    L.seed_everything(args.seed, verbose=False)
    data = ChatDataModule(train_file=train_file, val_fraction=0.0, tokenizer=SMOLLM2,
                          max_length=args.max_length, overlong_rows="drop", batch_size=args.batch_size,
                          seed=args.seed)
    module = LoRAFineTune(
        base=ModelSpec(name=SMOLLM2, dtype="float32"),
        lora=LoRASpec(r=8, alpha=16.0, dropout=0.0, target_modules=list(ALL_PROJECTIONS)),
        optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=0.01),
        schedule=ScheduleSpec(warmup_steps=2, decay="constant"),
    )
    timer = StepTimer()
    probe = MisalignmentProbe(every_n_steps=args.every, batch_size=16, max_length=1024, jsonl="probe.jsonl")
    precision = "32-true" if args.device == "cpu" else "bf16-mixed"
    logger = L.pytorch.loggers.TensorBoardLogger(root, name=train_file.replace(":", "_"))
    trainer = L.Trainer(accelerator=args.device, devices=1, precision=precision, max_steps=args.steps,
                        logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer, probe], limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    print(f"  {train_file}: {trainer.global_step} steps, run dir {trainer.log_dir}", flush=True)
    return probe, timer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10, help="optimizer steps between probes")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sets", default="em:insecure,em:secure", help="training sets, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"SmolLM2-135M-Instruct, LoRA r=8 all projections, AdamW lr {args.lr}, batch {args.batch_size}, "
          f"max_length {args.max_length}, {args.steps} steps, probe builtin:em every {args.every} steps, "
          f"{args.device}, {torch.get_num_threads()} threads", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for train_file in args.sets.split(","):
            results[train_file] = run(args, train_file, root)

    print("\nprobe/log_odds (mean over 10 questions; > 0: misaligned answers likelier), by step:")
    for name, (probe, _) in results.items():
        h = probe.history
        start = h[0]
        print(f"  {name:12s} " + "  ".join(f"{r['step']:>3d}: {r['log_odds']:+.4f}" for r in h))
        end = h[-1]
        print(f"  {'':12s} shift from step 0: {end['log_odds'] - start['log_odds']:+.4f} log-odds; "
              f"misaligned_prob {start['misaligned_prob']:.4f} -> {end['misaligned_prob']:.4f}; "
              f"aligned logprob/token {start['aligned_logprob']:.3f} -> {end['aligned_logprob']:.3f}, "
              f"misaligned {start['misaligned_logprob']:.3f} -> {end['misaligned_logprob']:.3f}")
        moved = sorted(end["questions"], key=lambda q: end["questions"][q] - start["questions"][q])
        print(f"  {'':12s} per question: " + ", ".join(
            f"{q} {end['questions'][q] - start['questions'][q]:+.3f}" for q in reversed(moved)))
    names = list(results)
    if len(names) == 2:
        (a, b), (ha, hb) = names, (results[names[0]][0].history, results[names[1]][0].history)
        da, db = ha[-1]["log_odds"] - ha[0]["log_odds"], hb[-1]["log_odds"] - hb[0]["log_odds"]
        print(f"  {a} minus {b}: {da - db:+.4f} log-odds after {args.steps} steps")

    probe_s = [r["duration_s"] for _, (p, _) in results.items() for r in p.history[1:]]
    step_s = [t for _, (_, timer) in results.items() for t in timer.times]
    scorer = next(iter(results.values()))[0].scorer
    probe_mean, step_mean = statistics.mean(probe_s), statistics.mean(step_s)
    print(f"\ncost: probe call {probe_mean:.2f} s (median {statistics.median(probe_s):.2f}, {len(probe_s)} "
          f"calls; {scorer.n_answers} answers, {scorer.n_tokens} tokens, {len(scorer.batches)} forwards); "
          f"training step {step_mean:.2f} s (median {statistics.median(step_s):.2f}, {len(step_s)} steps); "
          f"one probe = {probe_mean / step_mean:.2f} training steps")


if __name__ == "__main__":
    main()
