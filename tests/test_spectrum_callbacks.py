"""SpectrumLogger and SpectralPenalty with the real LoRAFineTune module, the real Trainer and TensorBoard files."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from em_lightning.callbacks.spectral_penalty import SpectralPenalty
from em_lightning.callbacks.spectrum_logger import SpectrumLogger
from em_lightning.lora import iter_lora_modules
from em_lightning.spectra import (
    PENALTIES,
    RATIO_METRICS,
    lora_singular_values,
    mean_penalty,
    spectral_metrics,
)

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


def _raw_penalty(module, form: str) -> torch.Tensor:
    """The mean penalty of the module's adapters, computed here independently of the callback."""
    return mean_penalty([(B, A, s) for *_, B, A, s in iter_lora_modules(module.model)], form)


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
def test_penalty_with_accumulation_4_equals_a_4x_batch(form, tiny_module):
    """4 micro-batches of 2 rows == 1 batch of 8 rows (SGD, 2 optimizer steps), penalty included.

    The module evaluates the term on the first micro-batch of each step only and scales it so the step's
    gradient is coeff·∇P whatever ``accumulate_grad_batches``: counting it once per micro-batch (×4) or
    forgetting Lightning's division by 4 (×1/4) would both break the equality. The task loss composes
    exactly because every row has 16 supervised tokens (see ``_rows``). Two steps, so the second window
    (batch_idx 4-7) is covered too.
    """
    rows = _rows(16)
    sgd = partial(torch.optim.SGD, lr=0.5)
    states = {}
    for label, batch, accumulate, callbacks in [
        ("big", 8, 1, [SpectralPenalty(form=form, coeff=2.0)]),
        ("accumulated", 2, 4, [SpectralPenalty(form=form, coeff=2.0)]),
        ("no_penalty", 8, 1, []),
    ]:
        module = tiny_module(sgd, random_B=True, configure=False)
        _fit(module, rows, batch, callbacks, max_steps=2, accumulate=accumulate)
        states[label] = _lora_state(module)

    for name, big in states["big"].items():
        torch.testing.assert_close(states["accumulated"][name], big, rtol=1e-5, atol=1e-6, msg=name)
    # ... and the penalty moved the weights far beyond that tolerance (a ×4 or ×1/4 error would show).
    effect = max((states["no_penalty"][n] - w).abs().max().item() for n, w in states["big"].items())
    assert effect > 1e-3, effect


@pytest.mark.parametrize("form,accumulate", [(form, 1) for form in PENALTIES] + [("neg_entropy", 4)])
def test_penalty_gradient_is_the_coefficient_times_the_penalty_gradient(form, accumulate, tiny_module):
    """One SGD step with the penalty moves the weights by exactly lr·coeff·∇P more than the same step without
    it, P being the configured form's mean over modules; with accumulation too (4 micro-batches of 1 row: the
    term enters once, not 4 times)."""
    rows, lr, coeff = _rows(4), 0.5, 3.0
    sgd = partial(torch.optim.SGD, lr=lr)
    start = tiny_module(sgd, random_B=True, configure=False)
    L.seed_everything(0, verbose=False)
    start.configure_model()
    _raw_penalty(start, form).backward()
    expected = {n: -lr * coeff * p.grad for n, p in start.model.named_parameters() if p.requires_grad}

    with_p, without = (tiny_module(sgd, random_B=True, configure=False) for _ in range(2))
    batch = 4 // accumulate
    _fit(with_p, rows, batch, [SpectralPenalty(form=form, coeff=coeff)], max_steps=1, accumulate=accumulate)
    _fit(without, rows, batch, [], max_steps=1, accumulate=accumulate)
    a, b = _lora_state(with_p), _lora_state(without)
    assert max(e.abs().max().item() for e in expected.values()) > 1e-3  # a step the comparison can see
    for n, step in expected.items():
        torch.testing.assert_close(a[n] - b[n], step, rtol=1e-4, atol=1e-6, msg=n)


def test_warmup_coefficient_follows_the_optimizer_step(tiny_module):
    """warmup_steps=2: step 0 has coefficient 0 (the same update as no penalty), step 1 has coeff/2, which the
    module applies as exactly lr·coeff/2·∇P at the weights after step 0."""
    rows, lr, coeff = _rows(8), 0.5, 3.0
    sgd = partial(torch.optim.SGD, lr=lr)
    warm, plain = (tiny_module(sgd, random_B=True, configure=False) for _ in range(2))
    _fit(warm, rows, 4, [SpectralPenalty(form="neg_entropy", coeff=coeff, warmup_steps=2)], max_steps=1)
    _fit(plain, rows, 4, [], max_steps=1)
    for n, w in _lora_state(warm).items():
        torch.testing.assert_close(w, _lora_state(plain)[n], rtol=0, atol=0, msg=n)  # coefficient(0) = 0

    warm.model.zero_grad(set_to_none=True)  # fit leaves the last step's gradients behind
    _raw_penalty(warm, "neg_entropy").backward()
    expected = {n: -lr * coeff / 2 * p.grad for n, p in warm.model.named_parameters() if p.requires_grad}
    # Step 1 from the weights after step 0, on rows 4-7, with and without the (half-warmed) penalty.
    two_warm, two_plain = (tiny_module(sgd, random_B=True, configure=False) for _ in range(2))
    _fit(two_warm, rows, 4, [SpectralPenalty(form="neg_entropy", coeff=coeff, warmup_steps=2)], max_steps=2)
    _fit(two_plain, rows, 4, [], max_steps=2)
    a, b = _lora_state(two_warm), _lora_state(two_plain)
    for n, step in expected.items():
        torch.testing.assert_close(a[n] - b[n], step, rtol=1e-4, atol=1e-6, msg=n)


def test_penalty_flattens_the_spectrum(tiny_module):
    """Same seed, same data: the run with the penalty ends with higher spectral entropy in every module."""
    rows = _rows(32, seed=1)
    entropies = {}
    for label, callbacks in [("off", []), ("on", [SpectralPenalty(coeff=1.0)])]:
        module = tiny_module(configure=False)
        _fit(module, rows, 8, callbacks, max_steps=24)
        sigma = torch.stack([lora_singular_values(B, A, s).detach() for _, _, B, A, s in iter_lora_modules(module.model)])
        entropies[label] = spectral_metrics(sigma)["entropy"]
    # Adam keeps a young adapter fairly flat already, so compare the distance to the maximum, log r.
    gap = {k: math.log(4) - v.mean() for k, v in entropies.items()}
    assert gap["on"] < 0.5 * gap["off"], entropies
    assert (entropies["on"] > entropies["off"]).all(), entropies


# ---------------------------------------------------------------------------------------------- the logger
@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, tiny_module):
    """A tiny fit with both callbacks, gradient accumulation 2, TensorBoard logger; 5 optimizer steps."""
    from lightning.pytorch.loggers import TensorBoardLogger

    tmp = tmp_path_factory.mktemp("spectra_run")
    module = tiny_module(configure=False)
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
    trainer, _ = logged_run
    scalars = _read(trainer.log_dir).scalars
    by = {tag: scalars[scalars["tag"] == tag].set_index("step")["value"] for tag in
          ("train/loss", "train/loss_total", "train/spectral_penalty", "train/spectral_penalty_coeff")}
    assert list(by["train/spectral_penalty_coeff"].round(6)[:3]) == [0.0, 0.25, 0.5]  # warm-up over 2 steps
    # loss_total = loss + coeff × raw penalty at every logged step; the raw penalty is in [1/√r, 1] once B ≠ 0
    for step in by["train/loss"].index:
        expected = by["train/loss"][step] + by["train/spectral_penalty_coeff"][step] * by["train/spectral_penalty"][step]
        assert by["train/loss_total"][step] == pytest.approx(expected, rel=1e-5)
    # The raw penalty of step j is that of the adapter after j updates, which SpectrumLogger wrote for
    # j = 0, 2, 4: the mean over modules of the penalty ‖σ‖₂/‖σ‖₁ of those spectra (0 at B = 0). (It used to be
    # compared with the metric of that name, which was 0 at B = 0 too; the metric is NaN there now, the penalty 0.)
    with open(f"{trainer.log_dir}/spectra.jsonl") as f:
        records = {r["step"]: r["modules"] for r in map(json.loads, f)}
    for step in (0, 2, 4):
        sigma = torch.tensor(list(records[step].values()), dtype=torch.float64)
        expected = PENALTIES["frob_nuclear_ratio"](sigma).mean().item()
        if step:  # the penalty of a non-zero spectrum is the metric
            assert expected == pytest.approx(spectral_metrics(sigma)["frob_nuclear_ratio"].mean().item(), rel=1e-12)
        assert by["train/spectral_penalty"][step] == pytest.approx(expected, rel=1e-5, abs=1e-12), step
    assert by["train/spectral_penalty"][0] == 0.0 and by["train/spectral_penalty"][4] > 0.5


def test_means_over_modules_average_the_defined_modules_only(tmp_path, tiny_module):
    """Step 0 with one adapter moved off B = 0 (the 13 others all-zero): a ratio metric's overall and q_proj means
    are that module's value (the undefined NaNs left out), other projections' means and the zero modules' own
    values are NaN, and norms average over every module (0 counts: a zero norm is defined)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    module = tiny_module()
    moved = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        for name, _, B, _, _ in iter_lora_modules(module.model):
            if name == moved:
                B.copy_(torch.randn(B.shape, generator=torch.Generator().manual_seed(3)))
        sigmas = {n: lora_singular_values(B, A, s) for n, _, B, A, s in iter_lora_modules(module.model)}
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="partly_zero")
    spectrum = SpectrumLogger(every_n_steps=100, log_histograms=False, log_image=False, jsonl=None)
    _fit(module, _rows(2), 2, [spectrum], logger=logger, max_steps=1)

    scalars = _read(logger.log_dir).scalars
    at0 = scalars[scalars["step"] == 0].set_index("tag")["value"]
    own = {k: v.item() for k, v in spectral_metrics(sigmas[moved]).items()}
    for metric in RATIO_METRICS:
        assert at0[f"spectra/all/{metric}"] == pytest.approx(own[metric], rel=1e-5), metric
        assert at0[f"spectra/by_proj/q_proj/{metric}"] == pytest.approx(own[metric], rel=1e-5), metric
        assert math.isnan(at0[f"spectra/by_proj/k_proj/{metric}"]), metric
        assert math.isnan(at0[f"spectra/model.layers.1.self_attn.q_proj/{metric}"]), metric
    assert at0["spectra/all/top"] == pytest.approx(own["top"] / len(sigmas), rel=1e-5)
    assert at0["spectra/by_proj/k_proj/top"] == 0.0


def test_logger_without_tensorboard_still_writes_jsonl(tmp_path, tiny_module):
    module = tiny_module(configure=False)
    trainer = _fit(module, _rows(4), 2, [SpectrumLogger(every_n_steps=1, log_per_module=False)], max_steps=2,
                   default_root_dir=str(tmp_path))
    lines = (tmp_path / "spectra.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]
    final = {n: lora_singular_values(B, A, s).detach() for n, _, B, A, s in iter_lora_modules(module.model)}
    last = json.loads(lines[-1])["modules"]
    for name, sigma in final.items():
        torch.testing.assert_close(torch.tensor(last[name]), sigma, rtol=1e-5, atol=1e-9)
    assert trainer.logger is None and not list(tmp_path.rglob("events.out.tfevents.*"))


def test_scalars_reach_every_logger_with_its_prefix(tmp_path, tiny_module):
    """TensorBoard gets the scalars as one event per step (a fast path); it must keep the logger's prefix like
    log_metrics does, and other loggers still get log_metrics."""
    import csv

    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    tb = TensorBoardLogger(save_dir=str(tmp_path), name="tb", prefix="run")
    csv_logger = CSVLogger(save_dir=str(tmp_path), name="csv")
    spectrum = SpectrumLogger(every_n_steps=1, log_image=False, jsonl=None)
    module = tiny_module(configure=False)
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
def test_accumulation_logs_no_step_zero_point_of_its_own(tmp_path, log_at_start, tiny_module):
    """Accumulation 2: the first micro-batch ends with global_step 0, and 0 % n == 0; only ``log_at_start`` may log
    step 0, and only once."""
    spectrum = SpectrumLogger(every_n_steps=2, log_per_module=False, log_image=False, log_at_start=log_at_start)
    module = tiny_module(configure=False)
    _fit(module, _rows(8), 1, [spectrum], max_steps=4, accumulate=2, default_root_dir=str(tmp_path))
    steps = [json.loads(line)["step"] for line in (tmp_path / "spectra.jsonl").read_text().splitlines()]
    assert steps == ([0] if log_at_start else []) + [2, 4]


def test_every_penalty_form_flattens_in_its_own_measure(tiny_module):
    """Each form, trained 8 AdamW steps from LoRA's B = 0 (so step 0 runs the all-zero spectrum), ends with a
    lower value of that form than the same run (seed, data) without it: it closes at least a fifth of the gap
    to the form's minimum, the value of a flat spectrum. (Entropy alone would not do: inv_stable_rank and
    log_condition push only on σ₁ and σ_r and may lower it.)"""
    rows, steps = _rows(32, seed=1), 8
    off = tiny_module(configure=False)
    _fit(off, rows, 4, [], max_steps=steps)
    with torch.no_grad():
        off_values = {form: _raw_penalty(off, form).item() for form in PENALTIES}
    for form, fn in PENALTIES.items():
        on = tiny_module(configure=False)
        _fit(on, rows, 4, [SpectralPenalty(form=form, coeff=1.0)], max_steps=steps)
        assert all(torch.isfinite(p).all() for p in _lora_state(on).values()), form
        with torch.no_grad():
            value = _raw_penalty(on, form).item()
        flat = fn(torch.ones(4)).item()
        assert value - flat < 0.8 * (off_values[form] - flat), (form, value, off_values[form], flat)


def test_cli_with_both_overlay_configs(run_cli, tmp_path):
    """The documented command: tiny.yaml + spectrum.yaml + spectral_penalty.yaml, through the real CLI; the
    penalty runs with the overlay's settings, and its raw value and coefficient reach TensorBoard at every
    step."""
    import yaml
    from tbparse import SummaryReader

    from tests.conftest import CONFIGS

    cli = run_cli("fit", "--config", "configs/tiny.yaml", "--config", "configs/callbacks/spectrum.yaml",
                  "--config", "configs/callbacks/spectral_penalty.yaml", "--trainer.max_steps", "3",
                  "--trainer.val_check_interval", "3")
    kinds = [type(c).__name__ for c in cli.trainer.callbacks]
    assert "SpectrumLogger" in kinds and "ModelCheckpoint" in kinds  # appended; tiny.yaml's are still there
    # isinstance: the config's class path gives the class imported here, not a second copy
    penalty = next(c for c in cli.trainer.callbacks if isinstance(c, SpectralPenalty))
    overlay = yaml.safe_load((CONFIGS / "callbacks" / "spectral_penalty.yaml").read_text())
    settings = overlay["trainer"]["callbacks+"][0]["init_args"]
    assert (penalty.form, penalty.coeff, penalty.warmup_steps) == (
        settings["form"], settings["coeff"], settings["warmup_steps"])

    log_dir = cli.trainer.log_dir
    lines = Path(log_dir, "spectra.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 3]
    assert not any(k.startswith("subspace") for k in json.loads(lines[-1]))  # subspace dynamics: off
    scalars = SummaryReader(log_dir, pivot=False).scalars
    assert "spectra/all/frob_nuclear_ratio" in set(scalars["tag"])
    assert not any("subspace" in tag for tag in scalars["tag"])
    by = {tag: scalars[scalars["tag"] == tag].set_index("step")["value"] for tag in
          ("train/loss", "train/loss_total", "train/spectral_penalty", "train/spectral_penalty_coeff")}
    assert list(by["train/spectral_penalty_coeff"].index) == [0, 1, 2]
    coefficients = [penalty.coefficient(s) for s in (0, 1, 2)]
    assert list(by["train/spectral_penalty_coeff"]) == pytest.approx(coefficients)
    raw = by["train/spectral_penalty"]
    assert raw[0] == 0.0 and raw[2] > 0  # B = 0 at the start, then trained
    total = by["train/loss"] + by["train/spectral_penalty_coeff"] * by["train/spectral_penalty"]
    assert list(by["train/loss_total"]) == pytest.approx(list(total), rel=1e-5)


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


def _readme_module(marker: str, tmp_path, monkeypatch):
    """The README's Python block ``marker``, imported as if saved as ``callbacks/<marker>``."""
    import importlib.util
    import sys

    name = f"em_lightning.callbacks.{marker.removesuffix('.py')}"
    source = tmp_path / marker
    source.write_text(_readme_block(marker))
    spec = importlib.util.spec_from_file_location(name, source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, name, module)
    return module


@pytest.mark.parametrize("accumulate", [1, 2])
def test_readme_worked_example_runs_as_written(run_cli, tmp_path, monkeypatch, accumulate):
    """callbacks/README.md's example callback and overlay, exactly as printed, through the real CLI; with gradient
    accumulation its first micro-batch ends at global_step 0 and must not log a point there."""
    from tbparse import SummaryReader

    _readme_module("lora_norms.py", tmp_path, monkeypatch)
    overlay = tmp_path / "lora_norms.yaml"
    overlay.write_text(_readme_block("lora_norms.yaml"))

    cli = run_cli("fit", "--config", "configs/tiny.yaml", "--config", str(overlay), "--trainer.max_steps", "5",
                  "--trainer.val_check_interval", "5", "--trainer.accumulate_grad_batches", str(accumulate))
    scalars = SummaryReader(cli.trainer.log_dir, pivot=False).scalars
    rows = scalars[scalars["tag"] == "lora_norm/by_proj/q_proj/B"]
    assert list(rows["step"]) == [5]
    # the values are the trained adapter's norms (step 5 is the last step), not zeros or stale numbers
    norms = {name: torch.linalg.matrix_norm(B.detach()).item()
             for name, _, B, _, _ in iter_lora_modules(cli.model.model)}
    q = [v for n, v in norms.items() if n.endswith("q_proj")]
    assert rows["value"].iloc[0] == pytest.approx(sum(q) / len(q), rel=1e-5) and min(q) > 0
    down = scalars[scalars["tag"] == "lora_norm/model.layers.1.mlp.down_proj/B"]["value"]
    assert list(down) == pytest.approx([norms["model.layers.1.mlp.down_proj"]], rel=1e-5)


def test_readme_loss_term_example_runs_as_written(tmp_path, monkeypatch, tiny_module):
    """callbacks/README.md's loss-term example, exactly as printed, under accumulation 2: one SGD step moves
    the weights by exactly lr·weight·∇(mean ‖B‖²) more than without it, and the module logs the raw term and
    its weight."""
    from lightning.pytorch.loggers import TensorBoardLogger

    example = _readme_module("b_norm_penalty.py", tmp_path, monkeypatch)
    assert example.BNormPenalty(coeff=1.0, warmup_steps=4).coefficient(2) == 0.5
    rows, lr, weight = _rows(4), 0.5, 0.25
    sgd = partial(torch.optim.SGD, lr=lr)
    start = tiny_module(sgd, random_B=True, configure=False)
    L.seed_everything(0, verbose=False)
    start.configure_model()
    raw = torch.stack([B.square().sum() for _, _, B, _, _ in iter_lora_modules(start.model)]).mean()
    raw.backward()
    expected = {n: -lr * weight * (p.grad if p.grad is not None else torch.zeros_like(p))
                for n, p in start.model.named_parameters() if p.requires_grad}

    with_term, without = (tiny_module(sgd, random_B=True, configure=False) for _ in range(2))
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="b_norm")
    _fit(with_term, rows, 2, [example.BNormPenalty(coeff=weight)], logger=logger, max_steps=1, accumulate=2)
    _fit(without, rows, 2, [], max_steps=1, accumulate=2)
    a, b = _lora_state(with_term), _lora_state(without)
    for n, step in expected.items():
        torch.testing.assert_close(a[n] - b[n], step, rtol=1e-4, atol=1e-6, msg=n)
    scalars = _read(logger.log_dir).scalars.set_index("tag")["value"]
    assert scalars["train/b_norm"] == pytest.approx(raw.item(), rel=1e-5)
    assert scalars["train/b_norm_coeff"] == pytest.approx(weight)


def test_old_callback_class_path_fails_naming_the_new_one(run_cli, tmp_path):
    """callbacks/README.md's promise: a config naming ``callbacks.<file>.<Class>`` (the pre-package path)
    fails at start-up with the file, line and the ``em_lightning.callbacks`` path to write instead."""
    from em_lightning.errors import InputError

    overlay = tmp_path / "old.yaml"
    overlay.write_text(
        "trainer:\n  callbacks+:\n    - class_path: callbacks.spectrum_logger.SpectrumLogger\n"
    )
    new_path = r"em_lightning\.callbacks\.spectrum_logger\.SpectrumLogger"
    with pytest.raises(InputError, match=rf"old\.yaml:3: .*{new_path}"):
        run_cli("fit", "--config", "configs/tiny.yaml", "--config", str(overlay), "--trainer.max_steps", "1")
