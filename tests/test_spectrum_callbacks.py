"""SpectrumLogger and SpectralPenalty with the real LoRAFineTune module, the real Trainer and TensorBoard files."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks.spectral_penalty import SpectralPenalty
from callbacks.spectrum_logger import SpectrumLogger
from em_lightning.lora import LoRASpec
from em_lightning.models import ModelSpec
from em_lightning.module import LoRAFineTune
from em_lightning.spectra import PENALTIES, lora_singular_values, spectral_metrics, spectral_penalty
from em_lightning.spectra import iter_lora_modules

SEQ, PROMPT = 24, 8  # every row: 24 tokens, the last 16 supervised (equal counts: per-token means compose exactly)


def _rows(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 300, (SEQ,), generator=g)
        labels = ids.clone()
        labels[:PROMPT] = -100
        rows.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels})
    return rows


def _module(optimizer=None, random_B: bool = False, r: int = 4) -> LoRAFineTune:
    return LoRAFineTune(
        base=ModelSpec(name="tiny-qwen3"),
        # init_lora_weights=False: B starts random, so the penalty acts from the first step.
        lora=LoRASpec(r=r, alpha=2.0 * r, init_lora_weights=not random_B),
        optimizer=optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)),
    )


def _fit(module, rows, batch_size, callbacks=(), logger=False, max_steps=2, accumulate=1, seed=0, **kw):
    L.seed_everything(seed, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=accumulate, logger=logger,
        callbacks=list(callbacks), enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1, num_sanity_val_steps=0, **kw,
    )
    trainer.fit(module, train_dataloaders=DataLoader(rows, batch_size=batch_size, shuffle=False))
    return trainer


def _lora_state(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------- the penalty
def test_coefficient_warmup_and_bad_config():
    p = SpectralPenalty(coeff=0.4, warmup_steps=4)
    assert [p.coefficient(s) for s in (0, 2, 4, 9)] == pytest.approx([0.0, 0.2, 0.4, 0.4])
    assert SpectralPenalty(coeff=0.4).coefficient(0) == 0.4
    with pytest.raises(ValueError, match="neg_entropy"):
        SpectralPenalty(form="flatness")
    with pytest.raises(ValueError, match="coeff"):
        SpectralPenalty(coeff=-1.0)


@pytest.mark.parametrize("form", ["frob_nuclear_ratio", "log_condition"])
def test_penalty_with_accumulation_4_equals_a_4x_batch(form):
    """4 micro-batches of 2 rows == 1 batch of 8 rows (SGD), penalty included.

    Not a general claim. The penalty term composes exactly under accumulation (it depends on the weights only, and
    Lightning divides each micro-batch's loss by 4). The task loss is the mean over each micro-batch's supervised
    tokens, so accumulation equals the big batch only when every micro-batch has the same number of supervised
    tokens, which this test arranges (every row has 16, see ``_rows``); with unequal counts the two differ.
    """
    rows = _rows(16)
    sgd = lambda params: torch.optim.SGD(params, lr=0.5)  # noqa: E731
    states = {}
    for label, batch, accumulate, callbacks in [
        ("big", 8, 1, [SpectralPenalty(form=form, coeff=2.0)]),
        ("accumulated", 2, 4, [SpectralPenalty(form=form, coeff=2.0)]),
        ("no_penalty", 8, 1, []),
    ]:
        module = _module(sgd, random_B=True)
        _fit(module, rows, batch, callbacks, max_steps=2, accumulate=accumulate)
        states[label] = _lora_state(module)

    for name, big in states["big"].items():
        torch.testing.assert_close(states["accumulated"][name], big, rtol=1e-5, atol=1e-6, msg=name)
    # ... and the penalty really entered the update (otherwise the equality above would prove nothing about it).
    assert any((states["no_penalty"][n] - w).abs().max() > 1e-4 for n, w in states["big"].items())


def test_penalty_gradient_is_the_coefficient_times_the_penalty_gradient():
    """One SGD step with the penalty moves the weights by exactly lr·coeff·∇P more than without it."""
    rows, lr, coeff = _rows(4), 0.5, 3.0
    sgd = lambda params: torch.optim.SGD(params, lr=lr)  # noqa: E731
    start = _module(sgd, random_B=True)
    L.seed_everything(0, verbose=False)
    start.configure_model()
    spectral_penalty(start.model, "neg_entropy").backward()
    expected = {n: -lr * coeff * p.grad for n, p in start.model.named_parameters() if p.requires_grad}

    with_p, without = _module(sgd, random_B=True), _module(sgd, random_B=True)
    _fit(with_p, rows, 4, [SpectralPenalty(form="neg_entropy", coeff=coeff)], max_steps=1)
    _fit(without, rows, 4, [], max_steps=1)
    a, b = _lora_state(with_p), _lora_state(without)
    for n in expected:
        torch.testing.assert_close(a[n] - b[n], expected[n], rtol=1e-4, atol=1e-6, msg=n)


def test_penalty_flattens_the_spectrum():
    """Same seed, same data: the run with the penalty ends with higher spectral entropy in every module."""
    rows = _rows(32, seed=1)
    entropies = {}
    for label, callbacks in [("off", []), ("on", [SpectralPenalty(coeff=1.0)])]:
        module = _module()
        _fit(module, rows, 8, callbacks, max_steps=24)
        sigma = torch.stack([lora_singular_values(B, A, s).detach() for _, _, B, A, s in iter_lora_modules(module.model)])
        entropies[label] = spectral_metrics(sigma)["entropy"]
    # Adam keeps a young adapter fairly flat already, so compare the distance to the maximum, log r.
    gap = {k: math.log(4) - v.mean() for k, v in entropies.items()}
    assert gap["on"] < 0.5 * gap["off"], entropies
    assert (entropies["on"] > entropies["off"]).all(), entropies


# ---------------------------------------------------------------------------------------------- the logger
@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A tiny fit with both callbacks, gradient accumulation 2, TensorBoard logger; 5 optimizer steps."""
    from lightning.pytorch.loggers import TensorBoardLogger

    tmp = tmp_path_factory.mktemp("spectra_run")
    module = _module(random_B=False)
    logger = TensorBoardLogger(save_dir=str(tmp), name="tiny")
    spectrum = SpectrumLogger(every_n_steps=2, per_module_every_n_steps=4, image_every_n_steps=4)
    trainer = _fit(module, _rows(24), 2, [spectrum, SpectralPenalty(coeff=0.5, warmup_steps=2)], logger=logger,
                   max_steps=5, accumulate=2)
    return trainer, module


def _read(log_dir):
    from tbparse import SummaryReader

    return SummaryReader(log_dir, pivot=False)


def test_logger_writes_scalars_histograms_and_images(logged_run):
    trainer, module = logged_run
    reader = _read(trainer.log_dir)
    scalars, hists = reader.scalars, reader.histograms
    names = [n for n, *_ in iter_lora_modules(module.model)]
    projs = sorted({n.rsplit(".", 1)[-1] for n in names})
    assert len(names) == 2 * 7 and len(projs) == 7

    tags = set(scalars["tag"])
    for metric in spectral_metrics(torch.ones(2)):
        assert f"spectra/all/{metric}" in tags
        assert all(f"spectra/by_proj/{p}/{metric}" in tags for p in projs)
        assert all(f"spectra/{n}/{metric}" in tags for n in names)
    assert {"train/loss", "train/loss_total", "train/spectral_penalty", "train/spectral_penalty_coeff"} <= tags

    # logged at the start (0), every 2 optimizer steps, and at the end (5); never twice per step (accumulation 2).
    steps = sorted(scalars[scalars["tag"] == "spectra/all/entropy"]["step"])
    assert steps == [0, 2, 4, 5]
    module_tag = f"spectra/{names[0]}/entropy"
    assert sorted(scalars[scalars["tag"] == module_tag]["step"]) == [0, 4, 5]  # per_module_every_n_steps, and end

    hist_tags = set(hists["tag"])
    assert {"spectra/all/sigma", *(f"spectra/by_proj/{p}/sigma" for p in projs)} <= hist_tags
    assert all(f"spectra/{n}/sigma" in hist_tags for n in names)
    assert sorted(set(hists[hists["tag"] == "spectra/all/sigma"]["step"])) == [0, 2, 4, 5]
    assert sorted(set(hists[hists["tag"] == f"spectra/{names[0]}/sigma"]["step"])) == [0, 4, 5]

    # tbparse decodes images only with TensorFlow installed; tensorboard's own reader gives the PNGs.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(trainer.log_dir, size_guidance={"images": 0}).Reload()
    plots = events.Images("spectra/plot")
    assert [p.step for p in plots] == [0, 4, 5]  # every image_every_n_steps, plus the end
    assert plots[-1].encoded_image_string.startswith(b"\x89PNG") and plots[-1].width > 100 and plots[-1].height > 100


def test_logged_scalars_and_jsonl_match_the_final_adapter(logged_run, tmp_path):
    trainer, module = logged_run
    with open(f"{trainer.log_dir}/spectra.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [0, 2, 4, 5]
    assert all(set(r["modules"]) == set(records[0]["modules"]) for r in records)
    assert all(s == 0.0 for sig in records[0]["modules"].values() for s in sig)  # B = 0 at the start
    # the last line is the spectrum of the trained adapter
    final = {n: lora_singular_values(B, A, s).detach() for n, _, B, A, s in iter_lora_modules(module.model)}
    assert set(final) == set(records[-1]["modules"])
    for name, sigma in final.items():
        torch.testing.assert_close(torch.tensor(records[-1]["modules"][name]), sigma, rtol=1e-5, atol=1e-9)
        assert records[-1]["scale"][name] == pytest.approx(2.0)

    scalars = _read(trainer.log_dir).scalars
    last = scalars[scalars["step"] == 5].set_index("tag")["value"]
    stacked = torch.stack(list(final.values()))
    metrics = spectral_metrics(stacked)
    assert last["spectra/all/entropy"] == pytest.approx(metrics["entropy"].mean().item(), rel=1e-5)
    q = torch.stack([s for n, s in final.items() if n.endswith("q_proj")])
    assert last["spectra/by_proj/q_proj/top"] == pytest.approx(spectral_metrics(q)["top"].mean().item(), rel=1e-5)
    assert last["spectra/all/effective_rank"] > 1.0  # the adapter trained away from B = 0

    # histograms hold what SummaryWriter.add_histogram would have written for these σ (same default bins)
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import make_histogram

    hists = _read(trainer.log_dir).histograms
    name = next(iter(final))
    got = hists[(hists["tag"] == f"spectra/{name}/sigma") & (hists["step"] == 5)].iloc[0]
    expected = make_histogram(final[name].double().numpy(), SummaryWriter(str(tmp_path)).default_bins)
    np.testing.assert_allclose(got["limits"], expected.bucket_limit)
    np.testing.assert_array_equal(got["counts"], expected.bucket)


def test_penalty_is_logged_apart_from_the_task_loss(logged_run):
    trainer, module = logged_run
    scalars = _read(trainer.log_dir).scalars
    by = {tag: scalars[scalars["tag"] == tag].set_index("step")["value"] for tag in
          ("train/loss", "train/loss_total", "train/spectral_penalty", "train/spectral_penalty_coeff")}
    assert list(by["train/spectral_penalty_coeff"].round(6)[:3]) == [0.0, 0.25, 0.5]  # warm-up over 2 steps
    # loss_total = loss + coeff × raw penalty at every logged step; the raw penalty is in [1/√r, 1] once B ≠ 0
    for step in by["train/loss"].index:
        expected = by["train/loss"][step] + by["train/spectral_penalty_coeff"][step] * by["train/spectral_penalty"][step]
        assert by["train/loss_total"][step] == pytest.approx(expected, rel=1e-5)
    assert by["train/spectral_penalty"].iloc[0] == 0.0
    assert all(1 / math.sqrt(4) - 1e-6 <= v <= 1 + 1e-6 for v in by["train/spectral_penalty"].iloc[1:])


def test_logger_without_tensorboard_still_writes_jsonl(tmp_path):
    module = _module()
    trainer = _fit(module, _rows(4), 2, [SpectrumLogger(every_n_steps=1, log_per_module=False)], max_steps=2,
                   default_root_dir=str(tmp_path))
    lines = (tmp_path / "spectra.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]
    assert trainer.logger is None


def test_scalars_reach_every_logger_with_its_prefix(tmp_path):
    """TensorBoard gets the scalars as one event per step (a fast path); it must keep the logger's prefix like
    log_metrics does, and other loggers still get log_metrics."""
    import csv

    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    tb = TensorBoardLogger(save_dir=str(tmp_path), name="tb", prefix="run")
    csv_logger = CSVLogger(save_dir=str(tmp_path), name="csv")
    spectrum = SpectrumLogger(every_n_steps=1, log_image=False, jsonl=None)
    module = _module()
    _fit(module, _rows(4), 2, [spectrum], logger=[tb, csv_logger], max_steps=2)
    names = [n for n, *_ in iter_lora_modules(module.model)]

    scalars = _read(tb.log_dir).scalars
    entropy = scalars[scalars["tag"] == "run-spectra/all/entropy"]
    assert sorted(entropy["step"]) == [0, 1, 2]
    assert f"run-spectra/{names[0]}/top" in set(scalars["tag"])
    assert not any(t.startswith("spectra/") for t in scalars["tag"])
    with open(f"{csv_logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("spectra/all/entropy")]
    assert [int(r["step"]) for r in logged] == [0, 1, 2]
    assert f"spectra/{names[0]}/top" in rows[0]
    # the same numbers through both paths
    assert float(logged[-1]["spectra/all/entropy"]) == pytest.approx(entropy.sort_values("step")["value"].iloc[-1])


@pytest.mark.parametrize("log_at_start", [False, True])
def test_accumulation_logs_no_step_zero_point_of_its_own(tmp_path, log_at_start):
    """Accumulation 2: the first micro-batch ends with global_step 0, and 0 % n == 0; only ``log_at_start`` may log
    step 0, and only once."""
    spectrum = SpectrumLogger(every_n_steps=2, log_per_module=False, log_image=False, log_at_start=log_at_start)
    _fit(_module(), _rows(8), 1, [spectrum], max_steps=4, accumulate=2, default_root_dir=str(tmp_path))
    steps = [json.loads(line)["step"] for line in (tmp_path / "spectra.jsonl").read_text().splitlines()]
    assert steps == ([0] if log_at_start else []) + [2, 4]


def test_every_penalty_form_trains(tmp_path):
    """Each form runs inside a real training step with finite loss (B = 0 on step 0 included)."""
    for form in PENALTIES:
        module = _module()
        _fit(module, _rows(4), 2, [SpectralPenalty(form=form, coeff=0.1)], max_steps=2)
        assert all(torch.isfinite(p).all() for p in _lora_state(module).values()), form


def test_cli_with_both_overlay_configs(run_cli, tmp_path):
    """The documented command: tiny.yaml + spectrum.yaml + spectral_penalty.yaml, through the real CLI."""
    from tbparse import SummaryReader

    cli = run_cli("fit", "--config", "configs/tiny.yaml", "--config", "configs/callbacks/spectrum.yaml",
                  "--config", "configs/callbacks/spectral_penalty.yaml", "--trainer.max_steps", "3",
                  "--trainer.val_check_interval", "3")
    kinds = [type(c).__name__ for c in cli.trainer.callbacks]
    assert "SpectrumLogger" in kinds and "SpectralPenalty" in kinds
    assert "ModelCheckpoint" in kinds  # the overlay appended; tiny.yaml's callbacks are still there
    log_dir = cli.trainer.log_dir
    records = [json.loads(line) for line in open(f"{log_dir}/spectra.jsonl")]
    assert [r["step"] for r in records] == [0, 3]
    tags = set(SummaryReader(log_dir, pivot=False).scalars["tag"])
    assert {"spectra/all/frob_nuclear_ratio", "train/spectral_penalty", "train/loss"} <= tags


def test_resumed_run_does_not_relog_the_checkpoint_step(run_cli, tmp_path):
    """Fit 10 steps (checkpoint at 10), resume to 20 from that checkpoint: the resumed run (a new version dir) logs
    nothing at step 10, which the first run's spectra.jsonl already holds for the same adapter."""
    from tbparse import SummaryReader

    common = ["--config", "configs/tiny.yaml", "--config", "configs/callbacks/spectrum.yaml",
              "--trainer.val_check_interval", "10"]
    first = run_cli("fit", *common, "--trainer.max_steps", "10")
    ckpt = first.trainer.checkpoint_callback.best_model_path or first.trainer.checkpoint_callback.last_model_path
    assert torch.load(ckpt, weights_only=False)["global_step"] == 10
    resumed = run_cli("fit", *common, "--trainer.max_steps", "20", "--ckpt_path", ckpt)
    assert resumed.trainer.log_dir != first.trainer.log_dir

    def steps(log_dir):
        return [json.loads(line)["step"] for line in open(f"{log_dir}/spectra.jsonl")]

    assert steps(first.trainer.log_dir) == [0, 10]
    assert steps(resumed.trainer.log_dir) == [20]
    scalars = SummaryReader(resumed.trainer.log_dir, pivot=False).scalars
    assert list(scalars[scalars["tag"] == "spectra/all/entropy"]["step"]) == [20]


def _readme_block(marker: str) -> str:
    from tests.conftest import REPO

    text = (REPO / "callbacks" / "README.md").read_text()
    after = text.split(f"<!-- example: {marker} -->", 1)[1]
    return after.split("```", 2)[1].split("\n", 1)[1]  # the fenced block's body, without its language line


@pytest.mark.parametrize("accumulate", [1, 2])
def test_readme_worked_example_runs_as_written(run_cli, tmp_path, monkeypatch, accumulate):
    """callbacks/README.md's example callback and overlay, exactly as printed, through the real CLI; with gradient
    accumulation its first micro-batch ends at global_step 0 and must not log a point there."""
    import importlib.util
    import sys

    from tbparse import SummaryReader

    source = tmp_path / "lora_norms.py"
    source.write_text(_readme_block("lora_norms.py"))
    spec = importlib.util.spec_from_file_location("callbacks.lora_norms", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "callbacks.lora_norms", module)  # as if saved as callbacks/lora_norms.py
    overlay = tmp_path / "lora_norms.yaml"
    overlay.write_text(_readme_block("lora_norms.yaml"))

    cli = run_cli("fit", "--config", "configs/tiny.yaml", "--config", str(overlay), "--trainer.max_steps", "5",
                  "--trainer.val_check_interval", "5", "--trainer.accumulate_grad_batches", str(accumulate))
    scalars = SummaryReader(cli.trainer.log_dir, pivot=False).scalars
    rows = scalars[scalars["tag"] == "lora_norm/by_proj/q_proj/B"]
    assert list(rows["step"]) == [5]
    assert rows["value"].iloc[0] > 0  # B left zero after 5 AdamW steps
    assert "lora_norm/model.layers.1.mlp.down_proj/B" in set(scalars["tag"])
