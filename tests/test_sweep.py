"""Sweeps: the tiny CPU sweep end to end through submitit's local executor (idempotent second invocation, a
killed run resumed, a submitit requeue resumed, the final adapter equal to an uninterrupted run's), the SLURM
path with fake sbatch/squeue/sacct/scontrol/srun on PATH, the analysis of the tiny sweep's run dirs, and the
sweep file's errors.

The tiny runs get their misalignment signal from ``tests.sweep_helpers.FakeProbe`` (probe.jsonl lines built by
the real probe's own record function), which also injects the faults. Every training run here is a real
``python -m em_lightning fit``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("submitit")
pytest.importorskip("tbparse")

import itertools

from em_lightning.sweep.cli import run_sweep
from em_lightning.sweep.spec import SweepError, load_sweep
from em_lightning.sweep.state import SweepLocked, read_state, sweep_lock
from tests.conftest import CONFIGS, REPO

FAKES = REPO / "tests" / "slurm_fakes"
STEPS = 30  # checkpoints at 10, 20, 30 (configs/tiny.yaml); probe every 5 steps


def write_sweep(
    path: Path,
    *,
    out: Path,
    launcher: dict,
    axes: dict | None = None,
    set_: dict | None = None,
    name: str = "tiny",
    seeds=(0, 1),
) -> Path:
    """A copy of configs/sweeps/tiny.yaml, made small and given the fake probe."""
    probe = path.parent / "probe_overlay.yaml"
    probe.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "callbacks+": [
                        {"class_path": "tests.sweep_helpers.FakeProbe", "init_args": {"every_n_steps": 5}}
                    ]
                }
            }
        )
    )
    tiny = yaml.safe_load((CONFIGS / "sweeps" / "tiny.yaml").read_text())
    optimizers = [
        {**e, "config": str(REPO / e["config"])} for e in tiny["axes"]["optimizer"][:2]
    ]  # adamw, sgd
    spec = {
        "name": name,
        "out": str(out),
        "base": [str(REPO / b) for b in tiny["base"]] + [str(probe)],
        "set": {**tiny["set"], "trainer.max_steps": STEPS, **(set_ or {})},
        "axes": axes if axes is not None else {"optimizer": optimizers},
        "seeds": list(seeds),
        "launcher": {"env": {"PYTHONPATH": str(REPO)}, **launcher},
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def snapshot(root: Path) -> dict[str, tuple]:
    return {
        str(p.relative_to(root)): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def train_loss(run_dir: Path):
    from em_lightning.analysis.table import load_run

    return load_run(run_dir, run_dir.name).series("train/loss")


def first_step(version_dir: Path) -> int:
    from tbparse import SummaryReader

    s = SummaryReader(str(version_dir), pivot=False).scalars
    return int(s[s["tag"] == "train/loss"]["step"].min())


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """2 optimisers × 2 seeds, trained by the local launcher two at a time: each run is handed one of two
    (fake) GPU indices as a run with a sidecar GPU would be (``eval_gpus: 1``); the CPU trainer ignores it."""
    tmp = tmp_path_factory.mktemp("tiny_sweep")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        path = write_sweep(
            tmp / "tiny.yaml", out=tmp / "runs", launcher={"kind": "local", "gpus": [0, 1], "eval_gpus": 1}
        )
        sweep = load_sweep(path)
        t0 = time.monotonic()
        logged: list[str] = []
        outcome = run_sweep(sweep, log=lambda line: (logged.append(line), print(line)))
        seconds = time.monotonic() - t0
    finally:
        os.chdir(cwd)
    return {
        "path": path,
        "sweep": sweep,
        "root": sweep.root,
        "outcome": outcome,
        "tmp": tmp,
        "seconds": seconds,
        "logged": logged,
    }


@pytest.mark.slow
def test_tiny_sweep_trains_every_run_and_a_second_invocation_changes_nothing(tiny_sweep, monkeypatch, capsys):
    root, _sweep = tiny_sweep["root"], tiny_sweep["sweep"]
    names = [
        "optimizer=adamw,seed=0",
        "optimizer=adamw,seed=1",
        "optimizer=sgd,seed=0",
        "optimizer=sgd,seed=1",
    ]
    assert tiny_sweep["outcome"] == dict.fromkeys(names, "done")
    states = {n: read_state(root / n) for n in names}
    for name, state in states.items():
        d = root / name
        assert state["state"] == "done" and state["attempts"] == 1 and state["launcher"] == "local"
        assert state["values"] == {"optimizer": name.split(",")[0].split("=")[1], "seed": int(name[-1])}
        assert len(state["git"]["commit"]) == 40 and isinstance(state["git"]["dirty"], bool)
        assert state["versions"]["torch"] and state["versions"]["lightning"] and state["job_id"]
        assert [v.name for v in d.glob("version_*")] == ["version_0"]
        assert (d / "version_0" / "adapters" / "final" / "adapter_model.safetensors").exists()
        config = yaml.safe_load((d / "config.yaml").read_text())
        from em_lightning.sweep.resolve import config_hash

        assert config_hash(config) == state["config_hash"]
        assert config["seed_everything"] == config["data"]["seed"] == int(name[-1])
        assert config["trainer"]["logger"]["init_args"]["save_dir"] == str(d)
    # One (fake) GPU index each, two runs at a time: some run started before another had finished.
    assert {s["cuda_visible_devices"] for s in states.values()} == {"0", "1"}
    spans = sorted((_time(s, "running"), _time(s, "done")) for s in states.values())
    assert any(b[0] <= a[1] for a, b in itertools.pairwise(spans))

    before = snapshot(root)
    monkeypatch.chdir(tiny_sweep["tmp"])
    again = run_sweep(load_sweep(tiny_sweep["path"]))
    assert again == dict.fromkeys(names, "done")
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k != ".sweep.lock"} == {
        k: v for k, v in before.items() if k != ".sweep.lock"
    }
    capsys.readouterr()
    from em_lightning.__main__ import main

    main(["sweep", "status", str(tiny_sweep["path"])])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["run", "state", "job", "step", "train_loss", "misalignment"]
    assert all(
        line.split()[1] == "done" and line.split()[3] == str(STEPS) and "(probe, step 30)" in line
        for line in table[1:5]
    )
    assert table[-1].endswith("4 done")


@pytest.mark.slow
def test_the_local_sweep_shows_run_k_of_n_elapsed_and_remaining_and_ends_with_a_summary(tiny_sweep):
    import re

    logged = tiny_sweep["logged"]
    started = [x for x in logged if re.match(r"\[\d/4\] started  optimizer=", x)]
    ended = [x for x in logged if re.match(r"\[\d/4\] done     optimizer=\S+ in (\d+h)?(\d+m)?\d+s", x)]
    assert [x[:5] for x in started] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert [x[:5] for x in ended] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert all(re.search(r"elapsed (\d+h)?(\d+m)?\d+s, remaining ", x) for x in started + ended)
    # no estimate before a run has ended; one after; none left after the last
    assert "remaining estimating" in started[0] and "remaining ~" in ended[0]
    assert ended[-1].endswith("remaining ~0s")
    assert re.fullmatch(r"sweep finished in (\d+h)?(\d+m)?\d+s: 4 done", logged[-1]), logged[-1]


@pytest.mark.slow
def test_analyze_the_tiny_sweep_with_the_probe_signal(tiny_sweep, tmp_path, capsys):
    from em_lightning.__main__ import main

    capsys.readouterr()
    out = tmp_path / "analysis"
    main(
        [
            "analyze",
            str(tiny_sweep["root"]),
            "--out",
            str(out),
            "--signal",
            "probe",
            "--json",
            "--bootstrap",
            "300",
        ]
    )
    summary = json.loads(capsys.readouterr().out)
    import pandas as pd

    table = pd.read_csv(out / "table.csv")
    assert summary["n_runs"] == 4 and summary["n_rows"] == len(table) == 4 * (STEPS // 5 + 1)
    assert sorted(table["step"].unique()) == list(range(0, STEPS + 1, 5))
    final = table[table["step"] == STEPS]
    assert (final["frac_trained"] == 1.0).all() and (final["batch_size"] == 8).all()
    assert (
        final[["train_loss", "tokens_seen", "probe_log_odds", "stable_rank", "entropy"]].notna().all().all()
    )
    assert set(final["optimizer"]) == {"adamw", "sgd"} and set(final["lr"]) == {1e-3, 1e-2}
    # nested least-squares fits on the same rows: adding the optimiser never lowers R²
    assert 0 <= summary["r2_loss"] <= summary["r2_loss_optimizer"] <= 1
    assert 0 <= summary["partial_r2_optimizer"] <= 1
    assert "optimizer" in summary["anova"] and "confounded" in summary["anova_dropped"]["lr"]
    assert sorted(summary["optimizer_rate_ratio"]["pair"]) == ["adamw", "sgd"]
    ratio = summary["optimizer_rate_ratio"]  # the higher mean rate over the lower, with a bootstrap interval
    high, low = ratio["pair"]
    assert ratio["value"] == pytest.approx(ratio["rates"][high] / ratio["rates"][low]) and ratio["value"] >= 1
    assert 0 < ratio["ci_low"] <= (ratio["ci_high"] or float("inf"))
    for name in (
        "loss_alignment",
        "trajectories",
        "rate_by_optimizer",
        "spectral_vs_misalignment",
        "seed_spread",
        "along_training",
    ):
        assert (out / "figures" / f"{name}.png").exists() and (out / "figures" / f"{name}.pdf").exists()
    report = (out / "report.md").read_text()
    assert "## ANOVA (type II)" in report and "Optimiser rate ratio" in report and "not drawn" not in report


@pytest.mark.slow
def test_a_killed_run_resumes_and_a_submitit_requeue_resumes_to_the_uninterrupted_adapter(
    tiny_sweep, tmp_path, monkeypatch
):
    """Attempt 1 dies at step 13 (job and trainer SIGKILLed: the state file still says running); the next
    invocation finds no live job and resumes from step 10. Attempt 2 gets submitit's signal at step 22: it
    stops the trainer, marks the run requeued, and submitit's local executor restarts the job, which resumes
    from step 20. The end: the uninterrupted run's adapter, probe values and merged training losses."""
    import torch
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    env = {
        "EM_TEST_KILL_AT_STEP": "13",
        "EM_TEST_KILL_MARKER": str(tmp_path / "killed"),
        "EM_TEST_PAUSE_AT_STEP": "22",
        "EM_TEST_PAUSE_MARKER": str(tmp_path / "paused"),
        "PYTHONPATH": str(REPO),
    }
    path = write_sweep(
        tmp_path / "tiny.yaml", out=tmp_path / "runs", launcher={"kind": "local", "gpus": [], "env": env}
    )
    only = ["optimizer=adamw,seed=0"]
    first = run_sweep(load_sweep(path), only=only)
    run_dir = tmp_path / "runs" / "tiny" / only[0]
    assert read_state(run_dir)["state"] == "running"  # what the dead job last wrote
    assert first[only[0]].startswith("running (its job died")

    def signal_at_pause():  # what SLURM does before a time limit, done to the local job
        deadline = time.monotonic() + 300
        while not (tmp_path / "paused").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        os.kill(read_state(run_dir)["pid"], signal.SIGUSR2)

    thread = threading.Thread(target=signal_at_pause, daemon=True)
    thread.start()
    second = run_sweep(load_sweep(path), only=only)
    thread.join(timeout=10)
    assert second == {only[0]: "done"}
    state = read_state(run_dir)
    assert [h["state"] for h in state["history"]] == [
        "submitted",
        "running",
        "submitted",
        "running",
        "requeued",
        "running",
        "done",
    ]
    assert state["attempts"] == 3 and state["resumed_from"] == str(
        run_dir / "version_1/checkpoints/last.ckpt"
    )
    assert sorted(v.name for v in run_dir.glob("version_*")) == ["version_0", "version_1", "version_2"]
    assert first_step(run_dir / "version_1") == 10  # optimizer step 11 (TensorBoard step = steps done before)
    assert first_step(run_dir / "version_2") == 20
    # The same config (output paths aside) as the uninterrupted run of the tiny sweep, and the same results.
    done = tiny_sweep["root"] / only[0]
    assert state["config_hash"] == read_state(done)["config_hash"]
    ours, theirs = (
        load_file(d / v / "adapters/final/adapter_model.safetensors")
        for d, v in ((run_dir, "version_2"), (done, "version_0"))
    )
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    a, b = train_loss(run_dir), train_loss(done)
    assert list(a.index) == list(range(STEPS)) and a.to_numpy().tolist() == pytest.approx(
        b.to_numpy().tolist()
    )
    from em_lightning.analysis.table import load_run

    probes = [{s: p["log_odds"] for s, p in load_run(d, "x").probe.items()} for d in (run_dir, done)]
    assert probes[0].keys() == probes[1].keys() and list(probes[0].values()) == pytest.approx(
        list(probes[1].values())
    )


@pytest.mark.slow
def test_slurm_submission_liveness_and_requeue_with_fake_slurm_commands(tmp_path, monkeypatch):
    import shlex

    from submitit.core.utils import DelayedSubmission

    from em_lightning.sweep.launcher_slurm import SLURM_PLUGIN

    fake = tmp_path / "slurm"
    fake.mkdir()
    monkeypatch.setenv("FAKE_SLURM_DIR", str(fake))
    monkeypatch.setenv("PATH", f"{FAKES}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    env = {
        "PYTHONPATH": str(REPO),
        "EM_TEST_PAUSE_AT_STEP": "12",
        "EM_TEST_PAUSE_MARKER": str(tmp_path / "paused"),
    }
    axes = {
        "size": [
            {"name": "small"},
            {"name": "big", "trainer.devices": 2, "trainer.accelerator": "gpu", "launcher.timeout_min": 600},
        ]
    }
    launcher = {
        "kind": "slurm",
        "partition": "gpu",
        "timeout_min": 90,
        "eval_gpus": 1,
        "cpus_per_task": 4,
        "mem_gb": 16,
        "array_parallelism": 1,
        "signal_delay_s": 100,
        "setup": ["echo setup"],
        "env": env,
    }
    path = write_sweep(tmp_path / "sl.yaml", out=tmp_path / "runs", launcher=launcher, axes=axes, name="sl")
    outcome = run_sweep(load_sweep(path))
    root = tmp_path / "runs" / "sl"
    ids = {
        "size=small,seed=0": "4242_0",
        "size=small,seed=1": "4242_1",
        "size=big,seed=0": "4243_0",
        "size=big,seed=1": "4243_1",
    }
    assert outcome == {n: f"submitted (job {j})" for n, j in ids.items()}
    for name, job in ids.items():
        state = read_state(root / name)
        assert (state["state"], state["job_id"], state["launcher"]) == ("submitted", job, "slurm")
    small, big = (fake / "submission_4242.sh").read_text(), (fake / "submission_4243.sh").read_text()
    for text, gpus, tasks, minutes in ((small, 1, 1, 90), (big, 3, 2, 600)):
        for flag in (
            "--array=0-1%1",
            f"--gpus-per-node={gpus}",
            f"--ntasks-per-node={tasks}",
            f"--time={minutes}",
            "--signal=USR2@100",
            "--partition=gpu",
            "--cpus-per-task=4",
            "--mem=16GB",
            "--nodes=1",
        ):
            assert f"#SBATCH {flag}\n" in text, (flag, text)
        assert "echo setup" in text and "srun --unbuffered" in text
    command = f"{sys.executable} -u -m submitit.core._submit {root / '.submitit'}"
    assert command in small

    # Liveness: three jobs are queued or running, 4243_1 is gone: only that run is submitted again.
    (fake / "queue").write_text("4242_0 RUNNING\n4242_1 PENDING\n4243_0 RUNNING\n")
    again = run_sweep(load_sweep(path))
    assert again["size=big,seed=1"] == "submitted (job 4244)" and list(again.values()).count("alive") == 3
    assert [line.split()[0] for line in (fake / "calls.log").read_text().splitlines()].count("sbatch") == 3
    assert "--array" not in (fake / "submission_4244.sh").read_text()  # one run: a plain job

    # The requeue path: SLURM runs array task 4242_0 and signals it before its time limit.
    run_dir = root / "size=small,seed=0"
    pickle = root / ".submitit" / "4242_0_submitted.pkl"
    mtime = pickle.stat().st_mtime_ns
    slurm_env = {
        **os.environ,
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "5000",
        "SLURM_ARRAY_JOB_ID": "4242",
        "SLURM_ARRAY_TASK_ID": "0",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NODELIST": "localhost",
        "SLURM_JOB_NAME": "em-sl",
    }
    task = __import__("subprocess").Popen(command.split(), env=slurm_env, cwd=tmp_path)
    deadline = time.monotonic() + 300
    while not (tmp_path / "paused").exists() and time.monotonic() < deadline and task.poll() is None:
        time.sleep(0.1)
    assert (tmp_path / "paused").exists(), (run_dir / "train.log").read_text()[-3000:]
    task.send_signal(signal.SIGUSR2)
    task.wait(timeout=180)
    assert "scontrol requeue 4242_0" in (fake / "calls.log").read_text()
    state = read_state(run_dir)
    assert (state["state"], state["job_id"], state["history"][-1]["state"]) == (
        "requeued",
        "4242_0",
        "requeued",
    )
    # Lightning's own SLURM requeue was off in the trainer: submitit owns it.
    plugins = yaml.safe_load((run_dir / "version_0" / "config.yaml").read_text())["trainer"]["plugins"]
    assert (
        plugins[0]["class_path"].endswith("SLURMEnvironment")
        and plugins[0]["init_args"]["auto_requeue"] is False
    )
    # The job submitit requeued is this run again, and it will resume from the checkpoint of step 10.
    assert pickle.stat().st_mtime_ns != mtime
    job = DelayedSubmission.load(pickle).function
    assert job.run_dir == str(run_dir) and job.launch_args == (
        f"--trainer.plugins={json.dumps(SLURM_PLUGIN)}",
    )
    assert shlex.split(state["command"])[6] == job.launch_args[0]  # what the trainer ran with
    from em_lightning.rundir import newest_checkpoint

    assert newest_checkpoint(run_dir) == run_dir / "version_0" / "checkpoints" / "last.ckpt"
    assert __import__("torch").load(newest_checkpoint(run_dir), weights_only=False)["global_step"] == 10


@pytest.mark.slow
def test_a_failing_run_is_recorded_and_listed_by_the_analysis(tmp_path, monkeypatch, capsys):
    from em_lightning.__main__ import main

    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "missing.jsonl"
    path = write_sweep(
        tmp_path / "f.yaml",
        out=tmp_path / "runs",
        launcher={"kind": "local", "gpus": []},
        set_={"data.train_file": str(missing)},
        seeds=[0],
        name="f",
        axes={"optimizer": [{"name": "adamw"}]},
    )
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", str(path)])
    assert exit_.value.code == 1
    run_dir = tmp_path / "runs" / "f" / "optimizer=adamw,seed=0"
    out = capsys.readouterr().out.splitlines()
    ended = next(x for x in out if x.startswith("[1/1] failed   optimizer=adamw,seed=0 in "))
    assert f"(see {run_dir / 'train.log'})" in ended
    summary = out[out.index(next(x for x in out if x.startswith("sweep finished in "))) :]
    assert summary[0].endswith(": 1 failed")
    assert (
        summary[1]
        == f"  failed   optimizer=adamw,seed=0: exit status 2: error: {missing}: data file does not exist"
    )
    assert summary[2] == f"           log: {run_dir / 'train.log'}"
    state = read_state(run_dir)
    assert state["state"] == "failed" and state["returncode"] == 2
    assert state["error"].splitlines()[0] == f"exit status 2: error: {missing}: data file does not exist"
    from em_lightning.errors import InputError

    # One run is no comparison: analyze refuses it, naming the run's state and error (issue 14.6)
    with pytest.raises(InputError, match="1 run") as err:
        main(["analyze", str(run_dir), "--out", str(tmp_path / "a"), "--signal", "probe"])
    assert f"(optimizer=adamw,seed=0: state failed: exit status 2: error: {missing}: data file does not exist)" in str(err.value)


# ------------------------------------------------------------------------------------------------ fast
def test_progress_estimates_the_time_left_from_the_runs_finished():
    from em_lightning.sweep.progress import Progress, duration, summary

    now = [100.0]
    lines: list[str] = []
    progress = Progress(5, parallel=2, log=lines.append, clock=lambda: now[0])
    progress.run_started("a")
    progress.run_started("b")
    assert progress.remaining_s() is None and lines[-1].endswith("elapsed 0s, remaining estimating")
    now[0] = 130.0
    progress.run_ended("a", "done")
    now[0] = 150.0
    progress.run_ended("b", "failed", Path("/r/b/train.log"))
    # runs took 30 s and 50 s: 40 s each on average, 3 left, 2 at a time
    assert progress.remaining_s() == pytest.approx(40 * 3 / 2)
    assert lines[-1] == "[2/5] failed   b in 50s  (see /r/b/train.log)  elapsed 50s, remaining ~1m00s"
    assert lines[-2] == "[1/5] done     a in 30s  elapsed 30s, remaining ~1m00s"  # 30 s × 4 left / 2
    assert duration(3725) == "1h02m05s"
    screen = summary(
        {"a": "done", "b": "failed"},
        {"b": "exit status 2: boom\ntraceback"},
        {"a": Path("/r/a/train.log"), "b": Path("/r/b/train.log")},
        50.0,
    )
    assert screen == [
        "sweep finished in 50s: 1 done, 1 failed",
        "  failed   b: exit status 2: boom",
        "           log: /r/b/train.log",
    ]
    many = summary(
        dict.fromkeys(map(str, range(15)), "failed"), {}, {str(i): Path(f"/{i}") for i in range(15)}, 1
    )
    assert len(many) == 1 + 2 * 10 + 1 and many[-1].startswith("  ... and 5 more")


def test_the_gpu_slot_scheduler_keeps_queue_order_and_gives_gpus_back():
    from em_lightning.sweep.slots import SlotScheduler

    s = SlotScheduler([0, 1, 2], cpu_slots=1)
    for run, gpus in (("two", 2), ("big", 3), ("one", 1), ("cpu", 0)):
        s.add(run, gpus)
    first = s.start_next()
    assert (first.run, first.gpus) == ("two", (0, 1))
    assert s.start_next() is None  # "big" waits for 3 GPUs and nothing overtakes it, though GPU 2 is free
    s.finish(first)
    big = s.start_next()
    assert (big.run, big.gpus, s.free) == ("big", (0, 1, 2), [])
    s.finish(big)
    one, cpu = s.start_next(), s.start_next()
    assert (one.gpus, cpu.gpus) == ((0,), ()) and not s.queue
    s.add("cpu2", 0)
    assert s.start_next() is None  # one CPU slot, taken
    s.finish(cpu)
    assert s.start_next().run == "cpu2" and s.busy


def test_launchers_are_a_registry_of_classes_with_their_own_settings(tmp_path):
    from em_lightning.sweep.launcher_local import LocalConfig, LocalLauncher
    from em_lightning.sweep.launcher_slurm import SlurmConfig
    from em_lightning.sweep.launchers import LauncherConfig, kinds, launcher_class

    assert kinds() == ["local", "slurm"] and launcher_class("local") is LocalLauncher
    f = tmp_path / "s.yaml"
    f.write_text("base: configs/tiny.yaml\nlauncher: {kind: slurm, partition: gpu, parallel: 2}\n")
    sweep = load_sweep(f)
    slurm = LauncherConfig.build(sweep, sweep.launcher)
    assert type(slurm) is SlurmConfig and slurm.partition == "gpu" and not hasattr(slurm, "parallel")
    # --launcher local on a SLURM file: the other kind's settings are kept, not refused, and come back
    local = LauncherConfig.build(sweep, {**sweep.launcher, "kind": "local"})
    assert type(local) is LocalConfig and local.parallel == 2 and local.other == {"partition": "gpu"}
    again = LauncherConfig.build(sweep, {"kind": "slurm", "timeout_min": 5}, base=local)
    assert type(again) is SlurmConfig and again.partition == "gpu" and again.timeout_min == 5
    # a launcher outside the project, named by its class path, with a setting of its own
    (tmp_path / "my_launcher.py").write_text(
        "from dataclasses import dataclass\n"
        "from em_lightning.sweep.launchers import Launcher, LauncherConfig\n"
        "@dataclass\nclass RayConfig(LauncherConfig):\n    address: str = 'auto'\n"
        "class RayLauncher(Launcher):\n    kind = 'my_launcher.RayLauncher'\n    Config = RayConfig\n"
        "    def launch(self, sweep, items, cwd, log=print):\n        return {i.name: 'ray' for i in items}\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        ray = LauncherConfig.build(sweep, {"kind": "my_launcher.RayLauncher", "address": "head:6379"})
        assert type(ray).__name__ == "RayConfig" and ray.address == "head:6379"
        with pytest.raises(SweepError, match="launcher.kind: kind: 'my_launcher.Nope'"):
            LauncherConfig.build(sweep, {"kind": "my_launcher.Nope"})
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_launcher", None)


def test_changed_config_of_an_existing_run_is_an_error(tmp_path, monkeypatch):
    from em_lightning.sweep.cli import _prepare, plan
    from em_lightning.sweep.launchers import LauncherConfig

    monkeypatch.chdir(tmp_path)
    path = write_sweep(tmp_path / "tiny.yaml", out=tmp_path / "runs", launcher={"kind": "local"}, seeds=[0])
    sweep = load_sweep(path)
    for p in plan(sweep, sweep.runs(), LauncherConfig()):  # write the run dirs as a first invocation would
        _prepare(sweep, p)
    assert [p.action for p in plan(sweep, sweep.runs(), LauncherConfig())] == ["resume", "resume"]
    spec = yaml.safe_load(path.read_text())
    spec["set"]["trainer.max_steps"] = STEPS + 5
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(SweepError, match=rf"trainer\.max_steps: {STEPS} → {STEPS + 5}") as err:
        run_sweep(load_sweep(path), dry_run=True)
    assert "2 run dir(s) hold another config" in str(err.value) and str(sweep.root) in str(err.value)
    assert json.loads((sweep.root / "optimizer=adamw,seed=0" / "run.json").read_text())["state"] == "pending"


def test_a_second_invocation_while_one_runs_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_sweep(tmp_path / "tiny.yaml", out=tmp_path / "runs", launcher={"kind": "local"})
    sweep = load_sweep(path)
    locked = rf"another `sweep` invocation \(pid {os.getpid()} on "
    with sweep_lock(sweep.root), pytest.raises(SweepLocked, match=locked):
        run_sweep(sweep)


@pytest.mark.parametrize(
    "text, message",
    [
        ("base: [configs/tiny.yaml]\nbogus: 1\n", "{f}:2: bogus: unknown key"),
        (
            "base: [configs/tiny.yaml, configs/nope.yaml]\n",
            "{f}:1: base[1]: configs/nope.yaml does not exist",
        ),
        (
            "base: configs/tiny.yaml\naxes:\n  data.batch_size: []\n",
            "{f}:3: axes.data.batch_size: an axis is a non-empty",
        ),
        (
            "base: configs/tiny.yaml\naxes:\n  opt:\n    - {name: a}\n    - {name: a}\n",
            "{f}:5: axes.opt[1]: two values give the run-name label 'a'",
        ),
        ("base: configs/tiny.yaml\nseeds: [1, 1]\n", "{f}:2: seeds: a count"),
        (
            "base: configs/tiny.yaml\naxes:\n  lr_level: [low]\nrules:\n  - {when: {lr: low}, set: {x: 1}}\n",
            "{f}:5: rules[0].when.lr: no axis is labelled 'lr'",
        ),
        (
            (
                "base: configs/tiny.yaml\naxes:\n  lr_level: [low, high]\n"
                "rules:\n  - {when: {lr_level: mid}, set: {a.b: 1}}\n"
            ),
            "{f}:5: rules[0]: matches no run",
        ),
        (
            "base: configs/tiny.yaml\nlauncher: {kind: local, gpu: 2}\n",
            "{f}:2: launcher.gpu: unknown launcher setting",
        ),
        (
            "base: configs/tiny.yaml\nlauncher: {kind: cloud}\n",
            "{f}:2: launcher.kind: kind: 'cloud': local or slurm",
        ),
        ("base: [configs/tiny.yaml\n", "{f}:2: not valid YAML"),
    ],
)
def test_sweep_file_errors_name_the_file_line_and_key(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(REPO)
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(SweepError) as err:
        run_sweep(load_sweep(f), dry_run=True)
    assert str(err.value).startswith(message.format(f=f)), str(err.value)


def test_an_unknown_config_key_is_the_training_clis_error_in_one_line(tmp_path, monkeypatch, cli_error):
    monkeypatch.chdir(REPO)
    f = tmp_path / "bad.yaml"
    f.write_text("base: configs/tiny.yaml\nset: {trainer.max_stepz: 3}\n")
    code, lines = cli_error(
        "sweep", f, "--dry-run", "--out", tmp_path / "o"
    )  # the real exit 2: test_module.py
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith(
        f"error: {f}: run default: the training CLI rejects its config:"
    )
    assert "max_stepz" in lines[0]


SHIPPED_SWEEPS = {  # every file in configs/sweeps/ and its number of runs
    "tiny": 6,
    "paper_main": 160,
    "paper_adam_12_models": 12,
    "seeds": 25,
    "learning_rate": 15,
    "control": 45,
    "control_tiny": 45,
    "mitigations": 2 * 2 * 9 * 3,
    "mitigations_tiny": 2 * 2 * 9 * 2,
}


def test_every_sweep_file_is_checked():
    assert sorted(p.stem for p in (CONFIGS / "sweeps").glob("*.yaml")) == sorted(SHIPPED_SWEEPS)


@pytest.mark.parametrize("name, n_runs", sorted(SHIPPED_SWEEPS.items()))
def test_shipped_sweeps_expand_and_their_first_run_resolves(name, n_runs, monkeypatch, tmp_path):
    from em_lightning.sweep.launchers import Item, LauncherConfig, resources
    from em_lightning.sweep.resolve import resolve

    monkeypatch.chdir(REPO)
    sweep = load_sweep(CONFIGS / "sweeps" / f"{name}.yaml", out=tmp_path)
    runs = sweep.runs()
    assert len(runs) == n_runs and len({r.name for r in runs}) == n_runs
    seeded = [r for r in runs if "seed" in r.values]
    assert all(r.overrides["seed_everything"] == r.overrides["data.seed"] == r.values["seed"] for r in seeded)
    first = resolve(sweep, runs[0])
    assert first.config["trainer"]["logger"]["init_args"]["save_dir"] == str(first.dir)
    assert resources(Item(first, LauncherConfig.build(sweep, sweep.launcher)), sweep)[0] >= 1


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHIPPED_SWEEPS))
def test_every_axis_value_of_the_shipped_sweeps_resolves_with_its_keys(name, monkeypatch, tmp_path):
    """One run per value of every axis goes through the training CLI's parser (so every overlay file a sweep
    names exists and parses), and every key the run sets is in its resolved config."""
    from em_lightning.sweep.resolve import resolve

    monkeypatch.chdir(REPO)
    sweep = load_sweep(CONFIGS / "sweeps" / f"{name}.yaml", out=tmp_path)
    uncovered = {(a.label, c.label) for a in sweep.axes for c in a.choices}
    for run in sweep.runs():
        pairs = {(k, str(v)) for k, v in run.values.items()} & uncovered
        if not pairs:
            continue
        uncovered -= pairs
        resolved = resolve(sweep, run)
        for key, value in run.overrides.items():  # axes, rules and seed, as merged for this run
            node = resolved.config
            if key.startswith("trainer.callbacks."):  # an init arg of the last callback
                node, key = node["trainer"]["callbacks"][-1]["init_args"], key.rsplit(".", 1)[1]
            for part in key.split("."):
                node = node[part]
            assert node == value, (run.name, key)
    assert not uncovered


MITIGATIONS = (
    "none",
    "spectral",
    "spectral_entropy",
    "spectral_stable_rank",
    "kl",
    "ldifs",
    "interleave",
    "steer",
    "ablate",
)  # every overlay of configs/mitigations/


def test_the_mitigation_sweeps_pair_every_mitigation_with_its_unmitigated_run():
    """A zipped `mitigation` axis of overlay files with a `none` entry: for every other mitigation, each run has
    an unmitigated twin with the same seed, optimiser and dataset (what `analyze` pairs)."""
    assert sorted(MITIGATIONS) == sorted(p.stem for p in (CONFIGS / "mitigations").glob("*.yaml"))
    for name in ("mitigations", "mitigations_tiny"):
        sweep = load_sweep(CONFIGS / "sweeps" / f"{name}.yaml")
        axis = next(a for a in sweep.axes if a.label == "mitigation")
        assert axis.choices[0].label == "none" and all(len(c.configs) == 1 for c in axis.choices)
        assert [c.label for c in axis.choices] == [*MITIGATIONS]
        assert all(c.configs[0] == f"configs/mitigations/{c.label}.yaml" for c in axis.choices)
        assert {c.label for c in axis.choices if c.overrides} == {"steer", "ablate"}  # their direction file
        runs = sweep.runs()
        key = lambda r: tuple((k, v) for k, v in r.values.items() if k != "mitigation")
        unmitigated = {key(r) for r in runs if r.values["mitigation"] == "none"}
        assert all(key(r) in unmitigated for r in runs)
        assert {r.values["optimizer"] for r in runs} == {"adamw", "lion"}
        assert {r.values["dataset"] for r in runs} == {"insecure", "secure"}


def test_a_sweep_key_sets_an_init_arg_of_the_last_callback_as_the_cli_does(tmp_path, monkeypatch):
    """``trainer.callbacks.<arg>`` in an axis entry: <arg> of the callback its overlay adds (the last one), the
    others untouched; a run without the key resolves as before; an arg the callback lacks is the parser's error."""
    from em_lightning.sweep.resolve import resolve

    monkeypatch.chdir(REPO)
    f = tmp_path / "s.yaml"
    f.write_text(
        "base: [configs/tiny.yaml, configs/callbacks/probe.yaml]\naxes:\n  mitigation:\n"
        "    - {name: none, config: configs/mitigations/none.yaml}\n"
        "    - {name: steer, config: configs/mitigations/steer.yaml, trainer.callbacks.direction: /d/v.safetensors,"
        " trainer.callbacks.coeff: 2.5}\n"
        "    - {name: bad, config: configs/mitigations/ablate.yaml, trainer.callbacks.directon: x}\n"
    )
    sweep = load_sweep(f, out=tmp_path / "o")
    none, steer, bad = sweep.runs()
    plain = resolve(sweep, none).config["trainer"]["callbacks"]
    steered = resolve(sweep, steer).config["trainer"]["callbacks"]
    assert steered[:-1] == plain and steered[-1]["class_path"].endswith("PreventativeSteering")
    assert (
        steered[-1]["init_args"]["direction"] == "/d/v.safetensors"
        and steered[-1]["init_args"]["coeff"] == 2.5
    )
    assert plain[-1]["init_args"]["probes"] == "builtin:em"
    with pytest.raises(
        SweepError, match=r"run mitigation=bad: the training CLI rejects its config: .*directon"
    ):
        resolve(sweep, bad)


def test_the_control_sweeps_cross_the_em_set_with_both_controls_and_every_optimiser():
    for name in ("control", "control_tiny"):
        runs = load_sweep(CONFIGS / "sweeps" / f"{name}.yaml").runs()
        cells = {(r.values["dataset"], r.values["optimizer"]) for r in runs}
        assert cells == {
            (d, o)
            for d in ("insecure", "secure", "educational")
            for o in ("sgd", "adam", "adamw", "lion", "muon")
        }
        assert {r.values["seed"] for r in runs} == {0, 1, 2}
        assert {r.overrides["data.train_file"] for r in runs} == {
            "em:insecure",
            "em:secure",
            "em:educational",
        }


def test_paper_main_sweep_gives_every_model_its_layout_and_every_run_its_batch():
    """Rows per optimizer step are 16 or 64 for every model, however many GPUs it needs."""
    sweep = load_sweep(CONFIGS / "sweeps" / "paper_main.yaml")
    for run in sweep.runs():
        o = run.overrides
        per_micro = o.get("data.batch_size", 4) * o.get("trainer.devices", 1) * o.get("trainer.num_nodes", 1)
        rows = per_micro * o["trainer.accumulate_grad_batches"]
        assert rows == int(run.values["batch"].removeprefix("bs")), run.name


def _time(state: dict, which: str) -> str:
    return next(h["time"] for h in state["history"] if h["state"] == which)


# ------------------------------------------------------------------ config resolution without the command line
SWEEP_HASHES = REPO / "tests" / "data" / "sweep_hashes.json.gz"
SNAPSHOT_OUT = "/sweep-out"  # the `out` the snapshot was resolved with (its text names the run dirs)


def _imports_of(source: str, package: str) -> set[str]:
    """Every module an ``import`` / ``from ... import`` in ``source`` names (``from a import b``: ``a`` and
    ``a.b``), relative ones made absolute from ``package`` (the package the source's module is in)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            base = base if node.level else node.module
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def _package_of(path: Path) -> str:
    parts = list(path.relative_to(REPO).parts)
    parts = (
        ["em_lightning", *parts] if parts[0] == "callbacks" else parts
    )  # installed as em_lightning.callbacks
    return ".".join(parts[:-1])


def test_no_module_of_the_package_imports_the_entry_point():
    """``em_lightning.__main__`` is the program, not a library: importing it from the package made a cycle
    (the sweep resolved configs by calling it and scraping its stderr)."""
    files = [*(REPO / "em_lightning").rglob("*.py"), *(REPO / "callbacks").rglob("*.py")]
    assert len(files) > 20
    offenders = [
        str(f.relative_to(REPO))
        for f in files
        if f.name != "__main__.py"
        and "em_lightning.__main__" in _imports_of(f.read_text(encoding="utf-8"), _package_of(f))
    ]
    assert offenders == []


@pytest.mark.parametrize(
    "source, package",
    [
        ("from em_lightning.__main__ import main", "em_lightning.sweep"),
        ("import em_lightning.__main__", "em_lightning.sweep"),
        ("def f():\n    from em_lightning import __main__", "em_lightning.sweep"),
        ("from ..__main__ import main", "em_lightning.sweep"),
        ("from .. import __main__", "em_lightning.sweep"),
        ("from .__main__ import main", "em_lightning"),
        ("from ...__main__ import main", "em_lightning.evaluation.assets"),
    ],
)
def test_the_import_scan_sees_every_spelling_of_the_entry_point(source, package):
    assert "em_lightning.__main__" in _imports_of(source, package)
    assert "em_lightning.__main__" not in _imports_of(source.replace("__main__", "cli"), package)


def write_sweep_hashes() -> None:
    """Rewrite the snapshot from the code as it is (after a deliberate change of what the sweeps resolve to)."""
    import gzip

    os.chdir(REPO)
    files = [p.name for p in sorted((CONFIGS / "sweeps").glob("*.yaml"))]
    text = json.dumps(_resolve_all(files), indent=1, sort_keys=True) + "\n"
    SWEEP_HASHES.write_bytes(gzip.compress(text.encode(), mtime=0))


def _resolve_all(files) -> dict[str, dict]:
    from em_lightning.sweep.resolve import resolve

    out = {}
    for name in files:
        # relative, as a user types it (the caller is in the repository): the text's header names the sweep file,
        # and an absolute path would tie the snapshot to where the repository was cloned
        sweep = load_sweep(Path("configs") / "sweeps" / name, out=SNAPSHOT_OUT)
        for run in sweep.runs():
            resolved = resolve(sweep, run)
            out[f"{name}::{run.name}"] = {"hash": resolved.hash, "text": resolved.text}
    return out


@pytest.mark.slow
def test_every_shipped_sweep_run_resolves_to_the_same_text_and_hash_as_before(monkeypatch):
    """The snapshot was written by the former resolver (``fit ... --print_config`` through ``__main__``, its
    stdout captured) at commit 2e1f2f6, for every run of every sweep file then in configs/sweeps/. A run dir
    whose hash changes is refused by the next `sweep` as changed, so any difference here is one a user sees.
    A deliberate change of a default (or a new parameter: it enters every hash) must regenerate the snapshot
    (``python -c "from tests.test_sweep import write_sweep_hashes; write_sweep_hashes()"``) and say so in the
    commit: existing run dirs of those sweeps will be refused as changed."""
    import difflib
    import gzip

    monkeypatch.chdir(REPO)  # the sweep files' paths are relative to the repository, like --config
    before = json.loads(gzip.decompress(SWEEP_HASHES.read_bytes()))
    files = sorted({key.split("::")[0] for key in before})
    now = _resolve_all(files)
    assert sorted(now) == sorted(before)
    changed = [key for key in before if now[key] != before[key]]
    first = changed[0] if changed else None
    diff = (
        "".join(
            difflib.unified_diff(
                before[first]["text"].splitlines(True), now[first]["text"].splitlines(True), n=1
            )
        )
        if first
        else ""
    )
    assert not changed, f"{len(changed)} of {len(before)} runs changed, first {first}:\n{diff}"


def test_resolution_equals_what_print_config_prints(tmp_path, monkeypatch):
    """The resolver's text is the training CLI's own ``fit ... --print_config`` output for the same stack of
    files (a real process: the comparison holds for whatever the classes' parameters are today)."""
    import subprocess

    from em_lightning.sweep.resolve import nested, output_keys, resolve

    monkeypatch.chdir(REPO)
    sweep = load_sweep(CONFIGS / "sweeps" / "tiny.yaml", out=tmp_path)
    run = sweep.runs()[-1]  # lion, seed 1: an overlay file, keys of the zipped axis and the seed
    resolved = resolve(sweep, run)
    overlay = tmp_path / "run.yaml"
    overlay.write_text(
        yaml.safe_dump(nested({**run.overrides, **output_keys(resolved.dir)}), sort_keys=False)
    )
    files = [*sweep.base, *run.configs, str(overlay)]
    printed = subprocess.run(
        [
            sys.executable,
            "-m",
            "em_lightning",
            "fit",
            *[a for f in files for a in ("--config", f)],
            "--print_config",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert resolved.text.split("\n", 2)[2] == printed  # without the sweep's two-line header
    assert resolved.config == yaml.safe_load(printed)
    assert (
        resolved.config["model"]["optimizer"]["class_path"].endswith("Lion")
        and resolved.config["seed_everything"] == 1
    )


def test_a_rejected_config_is_an_input_error_with_the_parsers_message_and_no_exit():
    from em_lightning.cli import ConfigRejected, resolve_fit_config
    from em_lightning.errors import InputError

    text, config = resolve_fit_config(["--config", str(CONFIGS / "tiny.yaml"), "--trainer.max_steps", "7"])
    assert config["trainer"]["max_steps"] == 7 and "max_steps: 7" in text
    with pytest.raises(ConfigRejected) as err:
        resolve_fit_config(["--config", str(CONFIGS / "tiny.yaml"), "--trainer.max_stepz", "7"])
    assert isinstance(err.value, InputError) and "max_stepz" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigRejected, match="model.lora.r"):
        resolve_fit_config(["--config", str(CONFIGS / "tiny.yaml"), "--model.lora.r", "many"])


def test_the_sweep_names_no_run_dir_file_itself():
    """run.json, config.yaml, train.log, checkpoints/last.ckpt, adapters/final, version dirs, states: the
    sweep's modules take them from em_lightning.rundir (a renamed file cannot hide from `sweep` or `status`)."""
    import ast

    from em_lightning import rundir

    names = {
        rundir.CONFIG,
        rundir.STATE,
        rundir.TRAIN_LOG,
        rundir.CHECKPOINTS,
        rundir.LAST_CHECKPOINT,
        rundir.ADAPTERS,
        rundir.FINAL_ADAPTER,
        rundir.DONE,
        rundir.PROBE,
        rundir.SUMMARY,
        *rundir.STATES,
    }
    states = set(rundir.STATES) - {rundir.DONE}  # states other than done are words, checked below
    found, written_states = [], set()
    for f in sorted((REPO / "em_lightning" / "sweep").glob("*.py")):
        tree = ast.parse(f.read_text(encoding="utf-8"))
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(n)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                hits = [n for n in names if n in node.value.split("/") or node.value.startswith("version_")]
                if hits and node.value not in states:
                    found.append(f"{f.name}:{node.lineno}: {node.value!r}")
            if isinstance(node, ast.keyword) and node.arg == "state" and isinstance(node.value, ast.Constant):
                written_states.add(node.value.value)
    assert found == []
    assert written_states and written_states <= set(rundir.STATES), written_states - set(rundir.STATES)


def test_sweep_modules_import_without_torch_and_status_without_the_analysis():
    """A submitit job imports the job module before anything trains; `sweep status` reads run dirs alone."""
    import subprocess

    code = (
        "import sys; import em_lightning.sweep.job, em_lightning.sweep.state, em_lightning.sweep.status, "
        "em_lightning.sweep.launchers, em_lightning.sweep.spec; "
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('em_lightning.analysis', "
        "'lightning'))); print(bad); sys.exit(bool(bad))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
