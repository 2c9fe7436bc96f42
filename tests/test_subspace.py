"""Subspace dynamics of LoRA adapters: principal angles between the top-k singular subspaces of ΔW = s·B·A at
two steps (em_lightning.spectra), and SpectrumLogger(subspace=True) writing them to spectra.jsonl and
TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from em_lightning.callbacks.spectrum_logger import SpectrumLogger
from em_lightning.lora import iter_lora_modules
from em_lightning.spectra import (
    SubspaceTracker,
    abs_cosine,
    grouped_singular_subspaces,
    lora_singular_subspaces,
    principal_cosines,
)
from tests.test_spectrum_callbacks import _fit, _rows

ANGLE_TOL = 1e-4
"""Degrees (~2e-6 rad): arccos near 1 turns float64 round-off in a cosine (~1e-14 here) into ~1e-5°."""


def _orthonormal(d: int, n: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))[0]


def _planted(d_out=40, d_in=30, r=6, seed=0):
    """ΔW = U diag(σ) Vᵀ with known singular vectors (and 2 spare orthonormal directions on each side), split
    into factors through a random gauge G: B = U diag(σ) G, A = G⁻¹ Vᵀ."""
    g = torch.Generator().manual_seed(seed)
    U, V = _orthonormal(d_out, r + 2, g), _orthonormal(d_in, r + 2, g)
    sigma = torch.linspace(3.0, 1.0, r, dtype=torch.float64)
    G = torch.eye(r, dtype=torch.float64) + 0.3 * torch.randn(r, r, generator=g, dtype=torch.float64)
    B = U[:, :r] * sigma @ G
    A = torch.linalg.solve(G, V[:, :r].mT)
    return B, A, U, V


def _rotation(d: int, planes) -> torch.Tensor:
    """The rotation of R^d turning u towards e by θ (degrees) in each plane (u, e), for orthonormal u, e's."""
    R = torch.eye(d, dtype=torch.float64)
    for u, e, theta in planes:
        c, s = math.cos(math.radians(theta)), math.sin(math.radians(theta))
        R += (c - 1) * (torch.outer(u, u) + torch.outer(e, e)) + s * (torch.outer(e, u) - torch.outer(u, e))
    return R


def _angles(before, after, k):
    """Principal angles (degrees, ascending) between the top-k subspaces of two (B, A) pairs, both sides."""
    s0, s1 = lora_singular_subspaces(*before, k), lora_singular_subspaces(*after, k)
    assert s0.defined and s1.defined
    return tuple(torch.rad2deg(torch.arccos(principal_cosines(x, y)))  # cosines descending: angles ascending
                 for x, y in ((s0.left, s1.left), (s0.right, s1.right)))


# ---------------------------------------------------------------------------------------------------- maths
@pytest.mark.parametrize("d_out,d_in,r,k", [(40, 30, 6, 3), (30, 120, 16, 16), (10, 6, 16, None),
                                            (64, 64, 1, 4)])
def test_bases_are_the_top_k_singular_vectors_of_the_dense_update(d_out, d_in, r, k):
    """Against the dense SVD of B·A (r above a side too: k is clamped to min(r, d_out, d_in)); batched and
    grouped agree with one by one."""
    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g) / math.sqrt(d_in)
    sub = lora_singular_subspaces(B, A, k)
    kk = min(k or r, r, d_out, d_in)
    U, _, Vh = torch.linalg.svd(B.double() @ A.double())
    assert sub.defined and sub.left.shape == (d_out, kk) and sub.right.shape == (d_in, kk)
    eye = torch.eye(kk, dtype=torch.float64)
    for basis, dense in ((sub.left, U[:, :kk]), (sub.right, Vh[:kk].mT)):
        torch.testing.assert_close(basis.mT @ basis, eye, atol=1e-12, rtol=0)
        # same span: the projectors agree (d×d is fine in a test)
        torch.testing.assert_close(basis @ basis.mT, dense @ dense.mT, atol=1e-10, rtol=0)

    B2, A2 = torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g)
    (idx, batched), = grouped_singular_subspaces([(B, A, 2.0), (B2, A2, 0.5)], k)
    assert idx == [0, 1]
    for j, (b, a) in enumerate(((B, A), (B2, A2))):
        one = lora_singular_subspaces(b, a, k)
        projector = batched.left[j] @ batched.left[j].mT
        torch.testing.assert_close(projector, one.left @ one.left.mT, atol=1e-10, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_planted_rotation_of_the_output_or_input_space_gives_its_angles(side):
    """Turn the top two singular directions of one side by 30° and 50° towards directions outside ΔW's span:
    the principal angles of that side are (0, 0, 30, 50), the other side's are 0; the factors are also
    re-gauged."""
    d_out, d_in, r, k = 40, 30, 6, 4
    B, A, U, V = _planted(d_out, d_in, r)
    basis, d = (U, d_out) if side == "left" else (V, d_in)
    R = _rotation(d, [(basis[:, 0], basis[:, r], 30.0), (basis[:, 1], basis[:, r + 1], 50.0)])
    g = torch.Generator().manual_seed(5)
    M = torch.eye(r, dtype=torch.float64) + 0.2 * torch.randn(r, r, generator=g, dtype=torch.float64)
    B1, A1 = (R @ B, A) if side == "left" else (B, A @ R.mT)  # ΔW' = R·ΔW or ΔW·Rᵀ
    B1, A1 = B1 @ M, torch.linalg.solve(M, A1)
    moved, still = _angles((B, A), (B1, A1), k)
    if side == "right":
        moved, still = still, moved
    expected = torch.tensor([0.0, 0.0, 30.0, 50.0], dtype=torch.float64)
    torch.testing.assert_close(moved, expected, atol=ANGLE_TOL, rtol=0)
    assert still.abs().max() < ANGLE_TOL, still


def test_tracker_reports_the_turn_since_its_previous_update_and_forgets_on_reset():
    """SubspaceTracker (what the logger calls): first update NaN (nothing before it), then the planted 30° turn
    of the output side against the previous update's bases as angles and mean cos², with the step compared with;
    after reset the next update is NaN again."""
    B, A, U, _ = _planted()
    B1 = _rotation(U.shape[0], [(U[:, 0], U[:, 6], 30.0)]) @ B
    tracker = SubspaceTracker(k=2)
    first = tracker.update(["m"], [(B, A, 1.0)], step=0)
    assert first.record["subspace_prev_step"] is None and first.record["subspace"]["m"]["left"] is None
    assert np.isnan(first.metrics["subspace_left_cos2"]).all()
    turned = tracker.update(["m"], [(B1, A, 1.0)], step=5)
    assert turned.record["subspace_prev_step"] == 0 and turned.record["subspace_k"] == 2
    assert turned.record["subspace"]["m"]["left"] == pytest.approx([0.0, 30.0], abs=ANGLE_TOL)
    assert turned.record["subspace"]["m"]["right"] == pytest.approx([0.0, 0.0], abs=ANGLE_TOL)
    cos2 = (1 + math.cos(math.radians(30.0)) ** 2) / 2
    assert turned.metrics["subspace_left_cos2"][0] == pytest.approx(cos2, abs=1e-9)
    assert "rank1_A_abs_cos" not in turned.metrics  # no rank-1 adapter
    tracker.reset()
    assert np.isnan(tracker.update(["m"], [(B1, A, 1.0)], step=6).metrics["subspace_right_cos2"]).all()


def test_rotation_within_the_span_turns_the_top_k_but_not_the_whole_span():
    """Mixing the 3rd and 4th left singular directions by 20°: the top-3 subspace turns by 20°, the top-4 and
    the whole column space (k = r) do not move."""
    r = 6
    B, A, U, _ = _planted(r=r)
    B1 = _rotation(U.shape[0], [(U[:, 2], U[:, 3], 20.0)]) @ B
    left3, right3 = _angles((B, A), (B1, A), 3)
    expected = torch.tensor([0.0, 0.0, 20.0], dtype=torch.float64)
    torch.testing.assert_close(left3, expected, atol=ANGLE_TOL, rtol=0)
    for k in (4, r):
        left, right = _angles((B, A), (B1, A), k)
        assert left.abs().max() < ANGLE_TOL and right.abs().max() < ANGLE_TOL, (k, left, right)
    assert right3.abs().max() < ANGLE_TOL


@pytest.mark.parametrize("r", [1, 8])
def test_no_change_and_a_gauge_change_give_zero(r):
    """B→B·M, A→M⁻¹·A (and any scale) leaves ΔW, hence its subspaces, unchanged: cos = 1, angles 0."""
    g = torch.Generator().manual_seed(2)
    B, A = torch.randn(50, r, generator=g), torch.randn(r, 70, generator=g) / math.sqrt(70)
    M = torch.randn(r, r, generator=g, dtype=torch.float64) + 2 * torch.eye(r, dtype=torch.float64)
    for B1, A1 in ((B, A), (B.double() @ M, torch.linalg.solve(M, A.double())), (-3 * B, A)):
        for x, y in zip(lora_singular_subspaces(B, A, 4)[:2], lora_singular_subspaces(B1, A1, 4)[:2]):
            cos = principal_cosines(x, y)
            assert cos.shape == (min(r, 4),) and (1 - cos).abs().max() < 1e-12
            assert torch.rad2deg(torch.arccos(cos)).max() < ANGLE_TOL


def test_zero_and_rank_deficient_updates_are_undefined_not_errors():
    """B = 0 (LoRA's start): undefined, zero bases (no NaN); ΔW of rank 2: the top-2 subspaces are defined and
    right, the top-3 not; a rank-deficient A (rank 3 of 4 rows) still gives the right top-3 subspaces."""
    g = torch.Generator().manual_seed(3)
    zero = lora_singular_subspaces(torch.zeros(20, 4), torch.randn(4, 9, generator=g), 2)
    assert not zero.defined and not zero.left.any() and not zero.right.any()
    batch = lora_singular_subspaces(torch.zeros(3, 20, 4), torch.randn(3, 4, 9, generator=g))
    assert batch.defined.tolist() == [False] * 3 and torch.isfinite(batch.left).all()

    rank2_B = torch.cat([torch.randn(20, 2, generator=g), torch.zeros(20, 2)], 1)
    rank3_A = torch.randn(3, 9, generator=g).repeat(2, 1)[:4]  # rows 0, 1, 2, 0
    for B, A in ((rank2_B, torch.randn(4, 9, generator=g)), (torch.randn(20, 4, generator=g), rank3_A)):
        rank = torch.linalg.matrix_rank(B @ A).item()
        U, _, Vh = torch.linalg.svd(B.double() @ A.double())
        sub = lora_singular_subspaces(B, A, rank)
        assert sub.defined
        torch.testing.assert_close(sub.left @ sub.left.mT, U[:, :rank] @ U[:, :rank].mT, atol=1e-9, rtol=0)
        torch.testing.assert_close(sub.right @ sub.right.mT, Vh[:rank].mT @ Vh[:rank], atol=1e-9, rtol=0)
        assert not lora_singular_subspaces(B, A, rank + 1).defined


def test_rank_one_abs_cosine():
    """|cos| between successive A and B vectors: a planted angle, a sign flip of both (ΔW unchanged) gives 1,
    B = 0 gives NaN."""
    g = torch.Generator().manual_seed(4)
    u, e = _orthonormal(30, 2, g).mT
    turned = math.cos(math.radians(40)) * u + math.sin(math.radians(40)) * e
    assert abs_cosine(3 * u, -turned).item() == pytest.approx(math.cos(math.radians(40)), abs=1e-12)
    b, a = torch.randn(30, 1, generator=g), torch.randn(1, 12, generator=g)
    assert abs_cosine(b[:, 0], -b[:, 0]).item() == pytest.approx(1.0, abs=1e-12)
    assert abs_cosine(a[0], -2 * a[0]).item() == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(abs_cosine(torch.zeros(30), b[:, 0]).item())
    batched = abs_cosine(torch.stack([u, u]), torch.stack([turned, torch.zeros(30)]))
    assert batched[0].item() == pytest.approx(math.cos(math.radians(40)), abs=1e-12) and batched[1].isnan()
    # for a rank-1 adapter the subspace cosines are these |cos|: left = B's, right = A's
    b1, a1 = b + 0.3 * torch.randn(30, 1, generator=g), a + 0.3 * torch.randn(1, 12, generator=g)
    s0, s1 = lora_singular_subspaces(b, a), lora_singular_subspaces(b1, a1)
    assert principal_cosines(s0.left, s1.left).item() == pytest.approx(abs_cosine(b[:, 0], b1[:, 0]).item())
    assert principal_cosines(s0.right, s1.right).item() == pytest.approx(abs_cosine(a[0], a1[0]).item())


# --------------------------------------------------------------------------------------------------- logger
class _Snapshots(L.Callback):
    """The adapters' (B, A, s) after every optimizer step (and at the start), keyed by global_step."""

    def __init__(self):
        self.factors: dict[int, dict[str, tuple]] = {}

    def _take(self, trainer, pl_module):
        self.factors[trainer.global_step] = {
            n: (B.detach().double().clone(), A.detach().double().clone(), s)
            for n, _, B, A, s in iter_lora_modules(pl_module.model)}

    def on_train_start(self, trainer, pl_module):
        self._take(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._take(trainer, pl_module)


def _dense_angles(before, after, k):
    """Principal angles (degrees, ascending) of both sides from the dense SVDs of s·B·A, by another formula:
    sin θ = σ((I − P₀)·X₁); None where a top-k subspace is undefined (σ_k ≤ 1e-6·σ₁)."""
    out = []
    svds = [torch.linalg.svd(s * B @ A) for B, A, s in (before, after)]
    (d_out, r), d_in = before[0].shape, before[1].shape[1]
    k = min(k, r, d_out, d_in)
    if any(S[k - 1] <= 1e-6 * S[0] for _, S, _ in svds):
        return None, None
    (U0, _, V0), (U1, _, V1) = svds
    for X0, X1 in ((U0[:, :k], U1[:, :k]), (V0[:k].mT, V1[:k].mT)):
        sin = torch.linalg.svdvals((torch.eye(X0.shape[0], dtype=X0.dtype) - X0 @ X0.mT) @ X1).clamp(max=1)
        out.append(sorted(torch.rad2deg(torch.arcsin(sin)).tolist()))
    return out


def _scalars(log_dir):
    from tbparse import SummaryReader

    scalars = SummaryReader(str(log_dir), pivot=False).scalars
    return {(t, s): v for t, s, v in zip(scalars["tag"], scalars["step"], scalars["value"])}


def _cos2(angles) -> float:
    return float(np.mean(np.cos(np.radians(angles)) ** 2)) if angles is not None else math.nan


def _check_tensorboard_matches_jsonl(scalars, records, per_module_steps):
    """TB per-module values: the mean cos² of the JSONL angles; by_proj and all: their NaN-skipping means."""
    for record in records:
        step = record["step"]
        for side in ("left", "right"):
            tag = f"subspace_{side}_cos2"
            values = {n: _cos2(m[side]) for n, m in record["subspace"].items()}
            defined = [v for v in values.values() if not math.isnan(v)]
            got = scalars[(f"spectra/all/{tag}", step)]
            assert (math.isnan(got) and not defined) or got == pytest.approx(np.mean(defined), rel=1e-5), step
            q = [v for n, v in values.items() if n.endswith("q_proj") and not math.isnan(v)]
            got = scalars[(f"spectra/by_proj/q_proj/{tag}", step)]
            assert (math.isnan(got) and not q) or got == pytest.approx(np.mean(q), rel=1e-5), step
            for name, value in values.items():
                key = (f"spectra/{name}/{tag}", step)
                assert (key in scalars) == (step in per_module_steps), key
                if key in scalars:
                    assert scalars[key] == pytest.approx(value, rel=1e-5, nan_ok=True), key


@pytest.mark.parametrize("r", [1, 4])
def test_logger_values_are_those_of_the_logged_adapters(tmp_path, r, tiny_module):
    """A real fit (TensorBoard, logs at 0, 2, 4 and the end, 5): each spectra.jsonl line holds the principal
    angles between the adapters at its step and at the previous logged one, as the dense SVDs of the snapshot
    adapters give them (top 2 of r = 4; rank 1), null where undefined (steps 0 and 2: nothing before, B = 0 at
    0); rank 1 also |cos| of successive A and B (A's defined against step 0); TensorBoard holds the same."""
    from lightning.pytorch.loggers import TensorBoardLogger

    snapshots = _Snapshots()
    spectrum = SpectrumLogger(every_n_steps=2, per_module_every_n_steps=4, log_image=False,
                              log_histograms=False, subspace=True, subspace_k=2)
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="sub")
    trainer = _fit(tiny_module(r=r, configure=False), _rows(20), 4, [spectrum, snapshots], logger=logger, max_steps=5)
    records = [json.loads(line) for line in Path(trainer.log_dir, "spectra.jsonl").read_text().splitlines()]
    assert [(x["step"], x["subspace_prev_step"]) for x in records] == [(0, None), (2, 0), (4, 2), (5, 4)]
    assert all({"modules", "scale", "subspace", "subspace_k"} <= set(x) for x in records)
    names = list(records[0]["modules"])
    assert all(list(x["subspace"]) == names for x in records)

    for record in records:
        step, prev = record["step"], record["subspace_prev_step"]
        for name, got in record["subspace"].items():
            assert set(got) == ({"left", "right", "A_abs_cos", "B_abs_cos"} if r == 1 else {"left", "right"})
            expected = _dense_angles(snapshots.factors[prev][name], snapshots.factors[step][name], 2) \
                if prev is not None else (None, None)
            for side, want in zip(("left", "right"), expected):
                if want is None:
                    assert got[side] is None, (step, name, side)
                else:
                    assert got[side] == pytest.approx(want, abs=2e-4), (step, name, side)
            if r == 1:
                for field, j in (("B_abs_cos", 0), ("A_abs_cos", 1)):
                    if prev is None or (field == "B_abs_cos" and prev == 0):  # nothing before, or B = 0
                        assert got[field] is None, (step, name, field)
                        continue
                    want = abs_cosine(snapshots.factors[prev][name][j].flatten(),
                                      snapshots.factors[step][name][j].flatten()).item()
                    assert got[field] == pytest.approx(want, rel=1e-5), (step, name, field)
    last = records[-1]["subspace"]
    assert all(len(m["left"]) == len(m["right"]) == min(2, r) for m in last.values())  # top k = 2 of r
    assert all(0 < a < 60 for m in last.values() for a in m["left"] + m["right"])  # the adapters did turn

    scalars = _scalars(trainer.log_dir)
    _check_tensorboard_matches_jsonl(scalars, records, per_module_steps={0, 4, 5})
    for step in (0, 2):
        assert math.isnan(scalars[("spectra/all/subspace_left_cos2", step)])
    rank1 = {t for t, _ in scalars if "rank1_" in t}
    if r == 1:
        assert {"spectra/all/rank1_A_abs_cos", "spectra/by_proj/v_proj/rank1_B_abs_cos",
                f"spectra/{names[0]}/rank1_A_abs_cos"} <= rank1
        a = [m["A_abs_cos"] for m in last.values()]
        assert scalars[("spectra/all/rank1_A_abs_cos", 5)] == pytest.approx(np.mean(a), rel=1e-5)
        assert math.isnan(scalars[("spectra/all/rank1_B_abs_cos", 2)])
        assert not math.isnan(scalars[("spectra/all/rank1_A_abs_cos", 2)])
    else:
        assert not rank1


def test_cli_tiny_with_subspace_on_and_the_first_value_after_a_resume_is_nan(run_cli, tmp_path):
    """tiny.yaml + the spectrum overlay with ``subspace: true`` through the real CLI: spectra.jsonl keeps its
    old keys and gets the angles, TensorBoard the cos² (read back with tbparse); resuming from the step-10
    checkpoint (bases not checkpointed) reads NaN / null at its first log."""
    import yaml

    from tests.conftest import CONFIGS

    overlay = yaml.safe_load((CONFIGS / "callbacks" / "spectrum.yaml").read_text())
    args = overlay["trainer"]["callbacks+"][0]["init_args"]
    assert args["subspace"] is False and args["subspace_k"] == 4  # off by default, the documented k
    args.update(subspace=True, every_n_steps=5, per_module_every_n_steps=5, log_image=False)
    path = tmp_path / "spectrum_subspace.yaml"
    path.write_text(yaml.safe_dump(overlay))
    common = ["--config", "configs/tiny.yaml", "--config", str(path), "--trainer.val_check_interval", "10"]

    first = run_cli("fit", *common, "--trainer.max_steps", "10")
    lines = Path(first.trainer.log_dir, "spectra.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(x["step"], x["subspace_prev_step"], x["subspace_k"]) for x in records] == [
        (0, None, 4), (5, 0, 4), (10, 5, 4)]
    assert set(records[-1]["modules"]) == set(records[-1]["subspace"]) and records[-1]["scale"]
    assert all(m["left"] is None and m["right"] is None for x in records[:2] for m in x["subspace"].values())
    last = records[-1]["subspace"].values()
    assert all(len(m["left"]) == len(m["right"]) == 4 for m in last)  # tiny.yaml: r = 4 = k
    scalars = _scalars(first.trainer.log_dir)
    _check_tensorboard_matches_jsonl(scalars, records, per_module_steps={0, 5, 10})
    assert 0 < scalars[("spectra/all/subspace_right_cos2", 10)] < 1

    ckpt = first.trainer.checkpoint_callback.last_model_path
    resumed = run_cli("fit", *common, "--trainer.max_steps", "12", "--ckpt_path", ckpt)
    lines = Path(resumed.trainer.log_dir, "spectra.jsonl").read_text().splitlines()
    (record,) = [json.loads(line) for line in lines]
    assert record["step"] == 12 and record["subspace_prev_step"] is None
    assert all(m["left"] is None and m["right"] is None for m in record["subspace"].values())
    scalars = _scalars(resumed.trainer.log_dir)
    assert math.isnan(scalars[("spectra/all/subspace_left_cos2", 12)])
    assert math.isnan(scalars[("spectra/by_proj/q_proj/subspace_right_cos2", 12)])
    assert scalars[("spectra/all/entropy", 12)] > 0  # the spectra themselves are logged as before


def test_bad_subspace_k_is_a_clear_error():
    with pytest.raises(ValueError, match="subspace_k"):
        SpectrumLogger(subspace=True, subspace_k=0)
    assert SpectrumLogger().subspace is False
