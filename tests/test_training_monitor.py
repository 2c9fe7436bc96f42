"""TrainingMonitor's values against the batches trained on, the wall clock and the process's peak memory (not just
its tags), and the lines that end a fit."""

from __future__ import annotations

from pathlib import Path

import pytest
from tbparse import SummaryReader

from tests.helpers import BatchCounts, StepWindows, find


def _max_rss_gib() -> float:
    import resource
    import sys

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 2**30


def _series(scalars, tag):
    rows = scalars[scalars["tag"] == tag].sort_values("step")
    return rows["value"].tolist()


def test_monitor_values_match_the_batches(run_cli):
    k, steps = 2, 4
    rss_before = _max_rss_gib()
    cli = run_cli("fit", "--config", "configs/tiny.yaml", "--trainer.max_steps", str(steps), "--data.batch_size", "3",
                  "--trainer.accumulate_grad_batches", str(k), "--trainer.limit_val_batches", "0",
                  "--trainer.callbacks+=tests.helpers.BatchCounts",
                  "--trainer.callbacks+=tests.helpers.StepWindows")
    counts = find(cli.trainer, BatchCounts).counts
    assert len(counts) == k * steps
    scalars = SummaryReader(cli.trainer.log_dir, pivot=False).scalars
    per_step = [counts[i * k : (i + 1) * k] for i in range(steps)]
    cumulative, expected_sup, expected_pad = 0, [], []
    for step in per_step:
        cumulative += sum(c[1] for c in step)
        expected_sup.append(float(cumulative))
        expected_pad.append(1 - sum(c[0] for c in step) / sum(c[2] for c in step))
    assert _series(scalars, "train/supervised_tokens") == expected_sup
    assert _series(scalars, "train/padding_frac") == pytest.approx(expected_pad, rel=1e-6)
    # tokens/s: the step's tokens over a time between the windows that bracket the monitor's own measure
    windows = find(cli.trainer, StepWindows)
    rates = _series(scalars, "train/tokens_per_s")
    assert len(rates) == len(windows.inner) == len(windows.outer) == steps
    for rate, step, (i0, i1), (o0, o1) in zip(rates, per_step, windows.inner, windows.outer):
        tokens = sum(c[0] for c in step)
        assert tokens / (o1 - o0) * (1 - 1e-6) <= rate <= tokens / (i1 - i0) * (1 + 1e-6), (rate, tokens)
    # the rate each step used: 2 warm-up steps ((s + 1) / 3 of lr 1e-3), then 1e-3
    assert _series(scalars, "train/lr") == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3], rel=1e-6)
    # peak host memory: never falls, starts at least at the peak before the fit and ends at most at the one after
    rss = _series(scalars, "memory/peak_rss_gib")
    assert len(rss) == steps and rss == sorted(rss)
    assert rss_before * (1 - 1e-6) <= rss[0] and rss[-1] <= _max_rss_gib() * (1 + 1e-6)
    assert not any(t.startswith("memory/peak_gpu") for t in set(scalars["tag"]))  # on CPU
    summary = cli.datamodule.summary["train"]
    assert _series(scalars, "data/train/rows") == [summary["rows"]]
    assert _series(scalars, "data/train/supervised_tokens") == [summary["supervised_tokens"]]


def test_fit_ends_with_where_things_went_and_the_next_commands_run(run_cli, capsys, tmp_path):
    import shlex
    import sys

    first = run_cli("fit", "--config", "configs/tiny.yaml", "--trainer.max_steps", "10",
                    "--trainer.limit_val_batches", "0")
    lines = capsys.readouterr().out.strip().splitlines()
    end = lines[lines.index("Fit finished at step 10."):]
    run_dir = Path(first.trainer.log_dir).absolute().relative_to(tmp_path)  # shown relative to the working dir
    said = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in end[1:]}
    assert said["run dir"] == str(run_dir)
    assert said["adapter"].split()[0] == str(run_dir / "adapters" / "final")
    assert (tmp_path / run_dir / "adapters" / "final" / "adapter_config.json").is_file()
    assert said["checkpoint"] == str(run_dir / "checkpoints" / "last.ckpt")
    tensorboard, logdir = said["TensorBoard"].split(" --logdir ")
    assert Path(tensorboard).name == "tensorboard" and logdir == str(run_dir.parent)
    # both suggested commands are ones the CLI takes: evaluate parses (its run needs a vLLM sidecar), fit resumes
    evaluate = shlex.split(said["next"])
    assert evaluate[0] == sys.executable and evaluate[1:4] == ["-m", "em_lightning", "evaluate"]
    with pytest.raises(SystemExit) as printed:
        run_cli(*evaluate[3:], "--print_config")
    assert printed.value.code == 0
    assert f"adapter: {run_dir / 'adapters' / 'final'}" in capsys.readouterr().out
    resume = shlex.split(said["train on"])
    assert resume[0] == sys.executable and resume[1:4] == ["-m", "em_lightning", "fit"]
    resumed = run_cli(*resume[3:], "--trainer.limit_val_batches", "0")
    assert resumed.trainer.global_step == 20


def test_the_gpu_peak_is_the_devices_max_allocated_in_gib(monkeypatch):
    """No GPU here: torch.cuda's counter stands in, to check which device is asked and the unit."""
    import torch

    from em_lightning.callbacks.training_monitor import peak_memory_gib

    asked = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: asked.append(device) or 3 * 2**30)
    on_gpu = peak_memory_gib(torch.device("cuda", 1))
    assert on_gpu["memory/peak_gpu_allocated_gib"] == 3.0 and asked == [torch.device("cuda", 1)]
    assert on_gpu["memory/peak_rss_gib"] == pytest.approx(_max_rss_gib(), rel=0.05)
    assert set(peak_memory_gib(torch.device("cpu"))) == {"memory/peak_rss_gib"}
