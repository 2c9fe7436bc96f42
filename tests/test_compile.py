"""``model.compile``: the compiled model trains like the eager one (LoRA, spectral penalty, probe), its checkpoints
have the same keys (no ``_orig_mod.``), and a compiled run's checkpoint resumes uncompiled and vice versa.

The CLI test compiles with the ``eager`` backend: dynamo traces the blocks (peft's LoRA layers included) and
installs the compiled calls exactly as with inductor, which is what the keys, the resume and the callbacks depend
on, in ~6 s instead of ~50 s on 2 shared CPU cores. The ``slow`` test checks inductor's numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from em_lightning import compile as compile_mod
from em_lightning.callbacks.misalignment_probe import MisalignmentProbe
from em_lightning.compile import compile_blocks, is_compiled
from em_lightning.loss import supervised_ce_sum
from tests.helpers import GradRecorder, LossRecorder, ParamSnapshot, find
from tests.test_packing import _collate, _model, _rows


@pytest.fixture
def dynamo_only(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(compile_mod, "BACKEND", "eager")
    yield
    torch._dynamo.reset()


COMMON = ["--config", "configs/tiny.yaml", "--config", "configs/callbacks/spectral_penalty.yaml",
          "--trainer.limit_val_batches", "0", "--trainer.callbacks+=tests.helpers.GradRecorder",
          "--trainer.callbacks+=tests.helpers.LossRecorder"]


def _adapter(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]


def test_compiled_training_matches_eager_and_checkpoints_resume_both_ways(run_cli, dynamo_only):
    runs = {}
    for compiled in (False, True):
        runs[compiled] = run_cli("fit", *COMMON, "--config", "configs/callbacks/probe.yaml", "--trainer.max_steps",
                                 "2", "--model.compile", str(compiled).lower())
        assert is_compiled(runs[compiled].model.model) is compiled
    eager, compiled = runs[False], runs[True]
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] >= 2  # really traced: with and without grad (the probe), at least
    # LoRA and the spectral penalty: the same step losses (task + penalty) and gradients.
    assert find(compiled.trainer, LossRecorder).losses == pytest.approx(find(eager.trainer, LossRecorder).losses,
                                                                           rel=1e-5)
    for step in (0, 1):
        g0, g1 = find(eager.trainer, GradRecorder).grads[step], find(compiled.trainer, GradRecorder).grads[step]
        assert set(g0) == set(g1)
        for key in g0:
            torch.testing.assert_close(g1[key], g0[key], rtol=1e-4, atol=1e-7)
    assert float(compiled.trainer.callback_metrics["train/spectral_penalty"]) > 0
    # The probe (no_grad, eval mode) at step 0 and at the end.
    probes = [find(run.trainer, MisalignmentProbe).history for run in (eager, compiled)]
    assert [r["step"] for r in probes[1]] == [0, 2]
    for a, b in zip(*probes):
        assert b["log_odds"] == pytest.approx(a["log_odds"], rel=1e-4, abs=1e-5)
    # The same checkpoint keys, none prefixed.
    ckpts = {c: Path(run.trainer.log_dir) / "checkpoints" / "last.ckpt" for c, run in runs.items()}
    keys = {c: set(_adapter(path)) for c, path in ckpts.items()}
    assert keys[True] == keys[False] and len(keys[True]) == 2 * 7 * 2
    assert not any("_orig_mod" in k for k in keys[True])
    assert "compile" not in torch.load(ckpts[True], weights_only=True)["hyper_parameters"]  # a resume sets its own
    # Each checkpoint resumes in the other mode, with the saved adapter loaded exactly.
    for written_compiled, path in ckpts.items():
        resumed = run_cli("fit", *COMMON, "--trainer.max_steps", "3", "--model.compile",
                          str(not written_compiled).lower(), "--trainer.callbacks+=tests.helpers.ParamSnapshot",
                          "--ckpt_path", str(path))
        assert is_compiled(resumed.model.model) is not written_compiled
        assert resumed.trainer.global_step == 3
        before = find(resumed.trainer, ParamSnapshot).before
        for name, value in _adapter(path).items():
            assert torch.equal(before[name], value), name


@pytest.mark.slow
def test_inductor_compiled_loss_and_gradients_equal_eager():
    """With inductor (the default backend), padded and then padding-free rows: the loss and adapter gradients of
    the tiny Qwen3 equal eager's to fp32 rounding (~40 s: one dynamic-shape compile serves both layouts)."""
    torch._dynamo.reset()
    models = {False: _model("tiny-qwen3"), True: _model("tiny-qwen3")}
    assert compile_blocks(models[True]) == 2 and is_compiled(models[True]) and not is_compiled(models[False])
    for padding_free in (False, True):
        results = []
        for model in models.values():
            model.zero_grad()
            loss, _ = supervised_ce_sum(model, _collate(_rows(), padding_free), True)
            loss.backward()
            results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}))
        (loss0, g0), (loss1, g1) = results
        torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-5)
        for key in g0:
            torch.testing.assert_close(g1[key], g0[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_bench_gpu_smoke_runs(tmp_path):
    """``scripts/bench_gpu.py --smoke`` (tiny shapes, CPU, dynamo-only compile) runs its rows and the packing
    check end to end (~20 s; TRL rows stand in as the HF loop so the test does not need the bench extra). Run as
    the user runs it, in its own process: tests import nothing from scripts/, and its compiles stay out of ours."""
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(Path(__file__).parents[1] / "scripts" / "bench_gpu.py"), "--smoke", "--device", "cpu",
         "--no-trl", "--steps", "2", "--spectra-steps", "2", "--skip", "em pf+compile+chunk", "--json", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert all(v < 1e-6 for v in summary["padding_free_check"].values())
    results = summary["results"]
    for row in ("em padded", "em padding-free", "em pf+compile", "em best+spectra", "HF loop"):
        assert results[row]["steps"] == 2 and results[row]["tokens_per_s"] > 0, row
