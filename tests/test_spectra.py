"""em_lightning.spectra: factored singular values against the dense SVD, metrics, penalties."""

from __future__ import annotations

import math

import pytest
import torch

from em_lightning.spectra import (
    PENALTIES,
    RATIO_METRICS,
    get_penalty,
    grouped_singular_values,
    lora_singular_values,
    mean_penalty,
    spectral_metrics,
)

METHODS = ["gram", "qr"]

SHAPES = [  # (d_out, d_in, r): square, tall, wide, rank 1, rank 64, r close to a side
    (48, 48, 8),
    (96, 40, 4),
    (30, 120, 16),
    (64, 64, 1),
    (200, 130, 64),
    (70, 66, 64),
]


def _factors(d_out, d_in, r, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(d_out, r, generator=g, dtype=torch.float64).to(dtype)
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64).to(dtype) / math.sqrt(d_in)
    return B.requires_grad_(), A.requires_grad_()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("d_out,d_in,r", SHAPES)
def test_values_and_gradients_match_dense_svdvals(d_out, d_in, r, method):
    B, A = _factors(d_out, d_in, r, seed=d_out + d_in + r)
    scale = 16 / r
    weights = torch.rand(r, generator=torch.Generator().manual_seed(r))  # a generic linear functional of σ

    sigma = lora_singular_values(B, A, scale, method)
    (weights * sigma).sum().backward()
    gB, gA = B.grad.clone(), A.grad.clone()
    B.grad = A.grad = None

    dense = torch.linalg.svdvals(scale * B @ A)[:r]
    (weights * dense).sum().backward()

    assert sigma.shape == (r,)
    assert torch.all(sigma[:-1] >= sigma[1:]), "not descending"
    torch.testing.assert_close(sigma, dense, rtol=1e-4, atol=1e-4 * dense[0].item())
    torch.testing.assert_close(gB, B.grad, rtol=1e-3, atol=1e-4 * B.grad.abs().max().item())
    torch.testing.assert_close(gA, A.grad, rtol=1e-3, atol=1e-4 * A.grad.abs().max().item())


@pytest.mark.parametrize("method", METHODS)
def test_negative_and_tensor_scale(method):
    B, A = _factors(20, 30, 5, seed=1)
    dense = torch.linalg.svdvals(B @ A)[:5]
    torch.testing.assert_close(lora_singular_values(B, A, -2.0, method), 2 * dense, rtol=1e-4, atol=1e-5)
    s = torch.tensor(0.5, requires_grad=True)
    lora_singular_values(B, A, s, method).sum().backward()
    torch.testing.assert_close(s.grad, dense.sum(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_upcast(dtype, method):
    B, A = _factors(64, 48, 8, seed=3, dtype=dtype)
    sigma = lora_singular_values(B, A, 2.0, method)
    assert sigma.dtype == torch.float32
    dense = torch.linalg.svdvals(2.0 * B.detach().float() @ A.detach().float())[:8]
    torch.testing.assert_close(sigma, dense, rtol=1e-4, atol=1e-4 * dense[0].item())
    sigma.sum().backward()
    assert B.grad.dtype == dtype and A.grad.dtype == dtype
    assert torch.isfinite(B.grad.float()).all() and torch.isfinite(A.grad.float()).all()


@pytest.mark.parametrize("method", METHODS)
def test_float64_stays_float64(method):
    B, A = _factors(10, 12, 3, seed=4, dtype=torch.float64)
    assert lora_singular_values(B, A, method=method).dtype == torch.float64


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("r", [1, 8])
def test_zero_B_gives_zeros_and_finite_gradients(r, method):
    _, A = _factors(32, 24, r, seed=5)
    B = torch.zeros(32, r, requires_grad=True)
    sigma = lora_singular_values(B, A, 2.0, method)
    assert torch.equal(sigma, torch.zeros(r))
    sigma.sum().backward()
    assert torch.isfinite(B.grad).all() and torch.isfinite(A.grad).all()

    for name, fn in PENALTIES.items():
        B.grad = A.grad = None
        value = fn(lora_singular_values(B, A, 2.0, method))
        value.backward()
        assert value.item() == 0.0, name
        assert torch.equal(B.grad, torch.zeros_like(B)), name
        assert torch.isfinite(A.grad).all() and not A.grad.any(), name

    # Was: every metric 0. A ratio of zeros is undefined, and 0 lies outside the range of each ratio metric
    # (entropy ≥ 0 only reaches 0 at rank one; ranks ≥ 1; condition ≥ 1; ‖σ‖₂/‖σ‖₁ ≥ 1/√r), so it would pull means
    # and fits: those are NaN now (issue 14.5), and the norms, which are defined, stay 0.
    metrics = spectral_metrics(torch.zeros(r))
    assert set(RATIO_METRICS) < set(metrics)
    for name, value in metrics.items():
        if name in RATIO_METRICS:
            assert torch.isnan(value), name
        else:
            assert value.item() == 0.0, name


@pytest.mark.parametrize("method", METHODS)
def test_rank_deficient_B_has_finite_penalty_gradients(method):
    _, A = _factors(40, 30, 6, seed=6)
    B = torch.zeros(40, 6)
    B[:, 0] = torch.randn(40)  # rank one: five exact zero singular values
    B.requires_grad_()
    for name, fn in PENALTIES.items():
        B.grad = None
        value = fn(lora_singular_values(B, A, method=method))
        value.backward()
        assert torch.isfinite(value), name
        assert torch.isfinite(B.grad).all(), name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("form", sorted(PENALTIES))
def test_penalty_gradients_match_finite_differences(form, method):
    B, A = _factors(9, 7, 4, seed=7, dtype=torch.float64)
    fn = PENALTIES[form]
    assert torch.autograd.gradcheck(lambda b, a: fn(lora_singular_values(b, a, 0.75, method)), (B, A), eps=1e-6,
                                    atol=1e-5)


@pytest.mark.parametrize("r", [2, 5, 16])
def test_metrics_of_flat_and_rank_one_spectra(r):
    flat = spectral_metrics(torch.full((r,), 3.0))
    torch.testing.assert_close(flat["entropy"], torch.tensor(math.log(r)))
    torch.testing.assert_close(flat["effective_rank"], torch.tensor(float(r)))
    torch.testing.assert_close(flat["stable_rank"], torch.tensor(float(r)))
    torch.testing.assert_close(flat["condition_number"], torch.tensor(1.0))
    torch.testing.assert_close(flat["frob_nuclear_ratio"], torch.tensor(1 / math.sqrt(r)))
    torch.testing.assert_close(flat["nuclear_norm"], torch.tensor(3.0 * r))
    torch.testing.assert_close(flat["top"], torch.tensor(3.0))

    one = spectral_metrics(torch.tensor([2.0] + [0.0] * (r - 1)))
    torch.testing.assert_close(one["entropy"], torch.tensor(0.0))
    torch.testing.assert_close(one["effective_rank"], torch.tensor(1.0))
    torch.testing.assert_close(one["stable_rank"], torch.tensor(1.0))
    torch.testing.assert_close(one["frob_nuclear_ratio"], torch.tensor(1.0))
    torch.testing.assert_close(one["condition_number"], torch.tensor(1e6))  # σ_r floored at 1e-6·σ₁
    torch.testing.assert_close(one["nuclear_norm"], torch.tensor(2.0))
    torch.testing.assert_close(one["frobenius_norm"], torch.tensor(2.0))


def test_metrics_are_batched():
    sigma = torch.rand(3, 4, 8)
    batched = spectral_metrics(sigma)
    single = spectral_metrics(sigma[1, 2])
    for k in single:
        assert batched[k].shape == (3, 4)
        torch.testing.assert_close(batched[k][1, 2], single[k])


@pytest.mark.parametrize("form", sorted(PENALTIES))
def test_every_penalty_is_lowest_for_a_flat_spectrum(form):
    fn = PENALTIES[form]
    flat = fn(torch.full((8,), 0.3))
    for seed in range(5):
        spread = torch.rand(8, generator=torch.Generator().manual_seed(seed)).sort(descending=True).values
        assert fn(spread) > flat
    assert fn(torch.tensor([1.0] + [0.0] * 7)) > flat


def test_unknown_form_is_a_clear_error():
    with pytest.raises(ValueError, match="frob_nuclear_ratio"):
        get_penalty("nuclear")


def test_mean_penalty_is_zero_for_zero_adapters_and_the_mean_of_each_otherwise():
    """Adapters of two shapes (a batched group and a single one); all-zero ones add 0 and no gradient but
    count in the mean, and the gradient reaches every non-zero B and A."""
    shapes = [(20, 16, 4), (20, 16, 4), (12, 16, 4), (20, 16, 4)]
    factors = [(*_factors(d_out, d_in, r, seed=20 + i, dtype=torch.float64), 0.5 + i)
               for i, (d_out, d_in, r) in enumerate(shapes)]
    zero = [(torch.zeros_like(B).requires_grad_(), A, s) for B, A, s in factors]
    value = mean_penalty(zero, "neg_entropy")
    value.backward()
    assert value.item() == 0.0
    assert all(not B.grad.any() and not A.grad.any() for B, A, _ in zero)

    for B, A, _ in factors:
        A.grad = None
    mixed = [factors[0], zero[1], factors[2], factors[3]]
    value = mean_penalty(mixed, "neg_entropy")
    manual = sum(PENALTIES["neg_entropy"](lora_singular_values(B, A, s)) for B, A, s in mixed) / 4
    torch.testing.assert_close(value, manual)
    value.backward()
    assert all(B.grad.abs().sum() > 0 and A.grad.abs().sum() > 0 for B, A, _ in (factors[0], *factors[2:]))
    with pytest.raises(ValueError, match="no active LoRA modules"):
        mean_penalty([])
    with pytest.raises(ValueError, match="neg_entropy"):
        mean_penalty(factors, "flatness")


@pytest.mark.parametrize("method", METHODS)
def test_autocast_does_not_lower_precision(method):
    B, A = _factors(64, 48, 8, seed=8)
    expected = lora_singular_values(B, A, method=method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lora_singular_values(B, A, method=method)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_batched_and_grouped_match_one_by_one(method):
    shapes = [(48, 40, 4), (20, 40, 4), (48, 40, 4), (48, 40, 4), (20, 40, 4), (30, 25, 2)]
    factors = [(*_factors(d_out, d_in, r, seed=10 + i), 0.5 + i) for i, (d_out, d_in, r) in enumerate(shapes)]
    groups = grouped_singular_values(factors, method)
    assert sorted(i for idx, _ in groups for i in idx) == list(range(len(shapes)))
    assert len(groups) == 3  # one batch per distinct shape
    weights = torch.rand(len(shapes), 4, generator=torch.Generator().manual_seed(0))
    total = sum((weights[idx, : sigma.shape[-1]] * sigma).sum() for idx, sigma in groups)
    total.backward()
    grouped_grads = [(B.grad.clone(), A.grad.clone()) for B, A, _ in factors]
    for i, (B, A, scale) in enumerate(factors):
        B.grad = A.grad = None
        one = lora_singular_values(B, A, scale, method)
        idx, sigma = next((idx, sigma) for idx, sigma in groups if i in idx)
        torch.testing.assert_close(sigma[idx.index(i)], one)
        (weights[i, : one.shape[-1]] * one).sum().backward()
        torch.testing.assert_close(grouped_grads[i][0], B.grad)
        torch.testing.assert_close(grouped_grads[i][1], A.grad)


def test_gram_floors_negligible_values_and_qr_keeps_them():
    """A rank-2 update: gram reports the 6 zero singular values as exact zeros; both agree on the non-zero ones."""
    _, A = _factors(50, 40, 8, seed=9)
    B = torch.zeros(50, 8)
    B[:, :2] = torch.randn(50, 2)
    gram, qr = lora_singular_values(B, A, method="gram"), lora_singular_values(B, A, method="qr")
    assert torch.equal(gram[2:], torch.zeros(6))
    assert (qr[2:] < 1e-5 * qr[0]).all()
    torch.testing.assert_close(gram[:2], qr[:2], rtol=1e-5, atol=0)


def test_bad_method_and_shapes_are_clear_errors():
    B, A = _factors(10, 12, 3, seed=4)
    for method in ("svd", "auto"):  # "auto" was an alias of gram: one name per method
        with pytest.raises(ValueError, match="method must be gram or qr"):
            lora_singular_values(B, A, method=method)
    with pytest.raises(ValueError, match="rank mismatch"):
        lora_singular_values(B, A.T)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("d_out,d_in,r", [(40, 10, 16), (10, 40, 16), (6, 10, 16)])
def test_rank_above_a_side_gives_r_values_padded_with_zeros(d_out, d_in, r, method):
    """r > d_in or r > d_out: ΔW has at most min(d_out, d_in) non-zero singular values; both methods return r, the
    rest exact zeros, so spectra of one adapter shape have one length whatever the method."""
    B, A = _factors(d_out, d_in, r, seed=d_out * d_in + r)
    weights = torch.rand(r, generator=torch.Generator().manual_seed(r))
    k = min(d_out, d_in)

    sigma = lora_singular_values(B, A, 0.5, method)
    (weights * sigma).sum().backward()
    gB, gA = B.grad.clone(), A.grad.clone()
    B.grad = A.grad = None
    dense = torch.linalg.svdvals(0.5 * B @ A)
    (weights[:k] * dense).sum().backward()

    assert sigma.shape == (r,)
    assert torch.equal(sigma[k:], torch.zeros(r - k))
    torch.testing.assert_close(sigma[:k], dense, rtol=1e-4, atol=1e-4 * dense[0].item())
    torch.testing.assert_close(gB, B.grad, rtol=1e-3, atol=1e-4 * B.grad.abs().max().item())
    torch.testing.assert_close(gA, A.grad, rtol=1e-3, atol=1e-4 * A.grad.abs().max().item())
    batched = lora_singular_values(torch.stack([B.detach()] * 2), torch.stack([A.detach()] * 2), 0.5, method)
    assert batched.shape == (2, r)
