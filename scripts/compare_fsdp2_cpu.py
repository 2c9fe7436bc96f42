"""Run the README's FSDP2 CPU command as written and the one-process run at the same global batch (8), and print
how far apart their final adapters are.

    python scripts/compare_fsdp2_cpu.py          # from the repository root; two tiny fits, ~1-2 min on 2 cores

Both runs write to ``runs/tiny/version_N`` like any README command (the newest version after each run is its
own). The figure printed is the adapter's max relative difference: over every LoRA tensor, max |a − b| divided
by max |b| (the one-process tensor's largest entry; element-wise ratios blow up where an entry is ~0).
The same global batch on the same rows must give the same adapter up to fp32 round-off (~1e-7).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README_FSDP2 = ("python -m em_lightning fit --config configs/tiny.yaml --config configs/strategy/fsdp2.yaml "
                "--trainer.devices 2 --trainer.accelerator cpu --data.batch_size 4")
ONE_PROCESS = "python -m em_lightning fit --config configs/tiny.yaml"  # batch 8 (tiny.yaml), one device
RUNS = REPO / "runs" / "tiny"


def newest_version() -> Path | None:
    from em_lightning.rundir import version_dirs

    versions = version_dirs(RUNS)
    return versions[-1] if versions else None


def run(command: str) -> Path:
    """Run ``command`` (``python`` is this interpreter) in the repository root; its new version dir."""
    before = newest_version()
    argv = [sys.executable, *command.split()[1:]]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    print(f"$ {command}", flush=True)
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    after = newest_version()
    if after is None or after == before:
        sys.exit(f"no new version dir under {RUNS}")
    return after


def final_adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapters" / "final" / "adapter_model.safetensors")


def max_relative_difference(got: dict, reference: dict) -> float:
    if set(got) != set(reference):
        sys.exit(f"different adapter tensors: {sorted(set(got) ^ set(reference))[:4]}")
    return max(float((got[k] - reference[k]).abs().max() / reference[k].abs().max()) for k in reference)


def main() -> None:
    fsdp2 = run(README_FSDP2)
    one = run(ONE_PROCESS)
    difference = max_relative_difference(final_adapter(fsdp2), final_adapter(one))
    print(f"FSDP2 2x4 ({fsdp2.relative_to(REPO)}) vs one process x8 ({one.relative_to(REPO)}): "
          f"adapter max relative difference {difference:.1e}")


if __name__ == "__main__":
    main()
