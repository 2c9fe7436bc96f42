"""Singular values of LoRA adapter updates, spectral metrics, and the penalties that flatten a spectrum.

A LoRA layer adds ΔW = s·B·A to a frozen weight (B: d_out×r, A: r×d_in, s = α/r, or α/√r with rsLoRA; peft keeps s
in ``layer.scaling[adapter]``). ΔW has at most r non-zero singular values, and they can be found without forming the
d_out×d_in product:

    Aᵀ = Q_A R_A (reduced QR, Q_A: d_in×r with orthonormal columns, R_A: r×r)
    ⇒ B·A = (B·R_Aᵀ)·Q_Aᵀ, and multiplying by Q_Aᵀ (orthonormal rows) keeps singular values,
    ⇒ σ(s·B·A) = |s|·σ(B·R_Aᵀ), the singular values of a d_out×r matrix: O((d_out + d_in)·r²) work.

Only A is factorised. LoRA's A is random and full rank from the start, so QR and its backward are well conditioned;
B starts at zero and is rank-deficient early, which ``svdvals`` and its backward (U·diag(∂σ)·Vᵀ) handle without NaN.
Factorising B as well (a second QR) would give NaN gradients at B = 0.

That is ``method="qr"``, the exact reference. But QR and SVD of many small tall matrices are slow where it matters:
on a GPU they run one cuSOLVER call per matrix (~0.15 ms each, ~50 ms for SmolLM2's 210 adapters), and multi-threaded
LAPACK on a tall-skinny QR can stall on a busy CPU. So the default, ``method="gram"``, works in float64 with batched
matrix products and r×r factorisations only (adapters of equal shape are stacked, see ``grouped_singular_values``):

    A·Aᵀ = L·Lᵀ (Cholesky, r×r) ⇒ σ(B·A) = σ(B·L), and σ(M)² = eig(MᵀM) for M = B·L (d_out×r),

with the backward of ``svdvals`` (U·diag(∂σ)·Vᵀ, U = M·V normalised) written out, so zero singular values have zero,
not infinite, gradient. float64 keeps the squared condition number harmless: round-off in σᵢ is ~1e-8·σ₁, and values
below 1e-7·σ₁ are returned as exactly 0.

Everything here is written for the all-zero spectrum of LoRA's first step: metrics are 0 there, penalties are 0 with
zero gradient, and no log, ratio or square root ever sees a zero (unsafe inputs are replaced *before* the unsafe op,
because ``torch.where`` after the op still propagates NaN gradients from the unselected branch).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator

import torch

EPS = 1e-12
"""A spectrum whose nuclear norm is at most ``EPS`` is treated as all-zero (LoRA's B = 0 gives exactly 0)."""

GRAM_FLOOR = 1e-7
"""``method="gram"`` returns singular values below ``GRAM_FLOOR``·σ₁ as 0 (below its float64 round-off, ~1e-8·σ₁)."""

LOG_CONDITION_FLOOR = 1e-6
"""``log_condition`` uses σ_r/σ₁ floored at this value, so a rank-deficient update gives log(1e6) ≈ 13.8, not ∞."""


# --------------------------------------------------------------------------------------------------------------------
# singular values
# --------------------------------------------------------------------------------------------------------------------


def lora_singular_values(
    B: torch.Tensor, A: torch.Tensor, scale: float | torch.Tensor = 1.0, method: str = "auto"
) -> torch.Tensor:
    """The singular values of ``scale * B @ A``, descending, differentiable, without forming the product.

    Args:
        B: the LoRA up-projection, shape (d_out, r) (peft's ``lora_B[adapter].weight``), or a batch (..., d_out, r).
        A: the LoRA down-projection, shape (r, d_in) (peft's ``lora_A[adapter].weight``), or a batch (..., r, d_in);
            must have full row rank (LoRA's random init guarantees it).
        scale: the adapter scaling s (peft's ``scaling[adapter]``: α/r, or α/√r with rsLoRA); a tensor of the batch
            shape for batched inputs.
        method: ``gram`` (Cholesky of A·Aᵀ, eigenvalues of the r×r Gram matrix in float64; batched kernels only,
            values below 1e-7·σ₁ read 0), ``qr`` (QR of Aᵀ, SVD of B·R_Aᵀ; exact, slow on GPU), or ``auto``
            (= ``gram``). ``gram`` needs r ≤ d_in (A·Aᵀ invertible) and falls back to ``qr`` otherwise. See the
            module docstring.

    Returns:
        r singular values per matrix, shape (..., r), with either method: when r > min(d_out, d_in) (ΔW has at most
        that rank) the last r − min(d_out, d_in) are exact zeros, so every adapter of rank r has a spectrum of length
        r. float32 for bf16/fp16/fp32 inputs, float64 for float64 inputs; gradients flow to B and A (and to
        ``scale`` if it is a tensor). Matches ``torch.linalg.svdvals(scale * B @ A)`` (padded with zeros to r);
        B = 0 gives zeros and finite (zero) gradients.
    """
    if B.ndim < 2 or A.ndim < 2:
        raise ValueError(f"lora_singular_values expects 2-D B and A, got shapes {tuple(B.shape)} and {tuple(A.shape)}")
    if B.shape[-1] != A.shape[-2]:
        raise ValueError(f"rank mismatch: B is {tuple(B.shape)} (d_out×r) but A is {tuple(A.shape)} (r×d_in)")
    if method not in ("auto", "qr", "gram"):
        raise ValueError(f"lora_singular_values: method must be auto, qr or gram, got {method!r}")
    if method == "auto":
        method = "gram"
    if A.shape[-2] > A.shape[-1]:  # r > d_in: A·Aᵀ is singular, Cholesky impossible
        method = "qr"
    dtype = torch.float64 if torch.float64 in (B.dtype, A.dtype) else torch.float32
    # Autocast (bf16-mixed / 16-mixed training) would run the products in half precision; they must stay exact.
    with torch.autocast(device_type=B.device.type, enabled=False):
        if method == "qr":
            B, A = B.to(dtype), A.to(dtype)
            _, R = torch.linalg.qr(A.mT, mode="reduced")  # R: min(r, d_in) × r
            sigma = torch.linalg.svdvals(B @ R.mT)  # min(r, d_in, d_out) values
            # r values whatever the shape (gram gives r, the extra ones 0): the rest are exact zeros of ΔW.
            sigma = torch.nn.functional.pad(sigma, (0, A.shape[-2] - sigma.shape[-1]))
        else:
            B, A = B.to(torch.float64), A.to(torch.float64)
            L, _ = torch.linalg.cholesky_ex(A @ A.mT)  # the _ex variant does not synchronise to check errors
            sigma = _GramSingularValues.apply(B @ L).to(dtype)
    if isinstance(scale, torch.Tensor):
        return sigma * scale.to(dtype=dtype, device=sigma.device).abs().unsqueeze(-1)
    return sigma * abs(float(scale))


class _GramSingularValues(torch.autograd.Function):
    """σ of M (..., m, r), descending, from the eigenvalues of the r×r Gram matrix MᵀM; backward U·diag(g)·Vᵀ."""

    @staticmethod
    def forward(ctx, M):
        eigenvalues, V = torch.linalg.eigh(M.mT @ M)  # ascending
        sigma, V = eigenvalues.flip(-1).clamp_min(0).sqrt(), V.flip(-1)
        keep = sigma > GRAM_FLOOR * sigma[..., :1]  # all False for M = 0
        ctx.save_for_backward(M, V, keep)
        return torch.where(keep, sigma, torch.zeros_like(sigma))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_sigma):
        M, V, keep = ctx.saved_tensors
        MV = M @ V  # column i is σᵢ·uᵢ
        norms = torch.linalg.vector_norm(MV, dim=-2, keepdim=True)
        U = MV / torch.where(keep.unsqueeze(-2), norms, torch.ones_like(norms))
        grad_sigma = torch.where(keep, grad_sigma, torch.zeros_like(grad_sigma))  # dropped values: no gradient
        return (U * grad_sigma.unsqueeze(-2)) @ V.mT


def grouped_singular_values(
    factors: list[tuple[torch.Tensor, torch.Tensor, float]], method: str = "auto"
) -> list[tuple[list[int], torch.Tensor]]:
    """Singular values of many adapters at once: ``factors`` is a list of ``(B, A, scale)``; adapters with equal
    shapes, dtype and device are stacked and decomposed as one batch (a model has ~5 distinct shapes, so ~5 batched
    QR/SVD calls instead of one per module: far fewer kernel launches and Python round trips).

    Returns ``[(indices, sigma)]``, ``sigma`` of shape (len(indices), r), row j belonging to ``factors[indices[j]]``.
    Differentiable like :func:`lora_singular_values` (stacking copies the weights but keeps their autograd history).
    """
    groups: dict[tuple, list[int]] = {}
    for i, (B, A, _) in enumerate(factors):
        groups.setdefault((tuple(B.shape), tuple(A.shape), B.dtype, A.dtype, B.device), []).append(i)
    out = []
    for idx in groups.values():
        if len(idx) == 1:
            B, A, scale = factors[idx[0]]
            out.append((idx, lora_singular_values(B, A, scale, method).unsqueeze(0)))
            continue
        B = torch.stack([factors[i][0] for i in idx])
        A = torch.stack([factors[i][1] for i in idx])
        scale = torch.tensor([float(factors[i][2]) for i in idx], dtype=torch.float64)
        out.append((idx, lora_singular_values(B, A, scale, method)))
    return out


# --------------------------------------------------------------------------------------------------------------------
# metrics (for logging) and penalties (for the loss)
# --------------------------------------------------------------------------------------------------------------------


def _safe(sigma: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(nonzero, sigma_safe): a mask of spectra with nuclear norm > eps, and sigma with all-zero spectra replaced by
    ones, so downstream ratios and logs are finite (and their gradient to the replaced entries is exactly zero)."""
    nonzero = sigma.sum(-1, keepdim=True) > eps
    return nonzero.squeeze(-1), torch.where(nonzero, sigma, torch.ones_like(sigma))


def _entropy(sigma_safe: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of p = σ/Σσ for spectra with Σσ > 0; p = 0 terms count 0 with zero gradient."""
    p = sigma_safe / sigma_safe.sum(-1, keepdim=True)
    positive = p > 0
    p_safe = torch.where(positive, p, torch.ones_like(p))
    return -torch.where(positive, p_safe * p_safe.log(), torch.zeros_like(p)).sum(-1)


def spectral_metrics(sigma: torch.Tensor) -> dict[str, torch.Tensor]:
    """Summary statistics of a spectrum ``sigma`` (shape (..., r), non-negative; any order).

    Returns a dict of tensors of shape ``sigma.shape[:-1]``:
      * ``entropy``: Shannon entropy (nats) of p = σ/Σσ; log r when flat, 0 for rank one.
      * ``effective_rank``: exp(entropy), in [1, r].
      * ``stable_rank``: Σσ²/σ₁², in [1, r].
      * ``condition_number``: σ₁/σ_r, ≥ 1; σ_r is floored at 1e-6·σ₁, so a rank-deficient update reads 1e6.
      * ``frob_nuclear_ratio``: ‖σ‖₂/‖σ‖₁, in [1/√r (flat), 1 (rank one)].
      * ``nuclear_norm``: Σσ.  ``top``: σ₁.  ``frobenius_norm``: ‖σ‖₂.
    Every metric is 0 for an all-zero spectrum (LoRA's start), a value no non-zero spectrum takes for the ratio
    metrics, so "not started yet" is visible in plots instead of NaN.
    """
    sigma = sigma.float() if sigma.dtype in (torch.float16, torch.bfloat16) else sigma
    nonzero, s = _safe(sigma)
    top = s.amax(-1)
    smallest = s.amin(-1)
    frob = s.square().sum(-1).sqrt()
    nuclear = s.sum(-1)
    entropy = _entropy(s)
    raw = {
        "entropy": entropy,
        "effective_rank": entropy.exp(),
        "stable_rank": s.square().sum(-1) / top.square(),
        "condition_number": top / torch.maximum(smallest, LOG_CONDITION_FLOOR * top),
        "frob_nuclear_ratio": frob / nuclear,
        "nuclear_norm": nuclear,
        "top": top,
        "frobenius_norm": frob,
    }
    return {k: torch.where(nonzero, v, torch.zeros_like(v)) for k, v in raw.items()}


def _masked(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a penalty of a non-zero spectrum so an all-zero spectrum gives 0 with zero (not NaN) gradient."""

    def penalty(sigma: torch.Tensor) -> torch.Tensor:
        nonzero, s = _safe(sigma)
        value = fn(s)
        return torch.where(nonzero, value, torch.zeros_like(value))

    penalty.__name__ = fn.__name__
    penalty.__doc__ = fn.__doc__
    return penalty


@_masked
def frob_nuclear_ratio(s: torch.Tensor) -> torch.Tensor:
    """‖σ‖₂/‖σ‖₁ (the paper's reported form): 1 for rank one, minimal 1/√r when all r singular values are equal.
    Scale-invariant, so its gradient grows like 1/‖σ‖ while the adapter is small: use a warm-up."""
    return s.square().sum(-1).sqrt() / s.sum(-1)


@_masked
def neg_entropy(s: torch.Tensor) -> torch.Tensor:
    """−H(σ/Σσ) in nats: 0 for rank one, minimal −log r when flat."""
    return -_entropy(s)


@_masked
def log_condition(s: torch.Tensor) -> torch.Tensor:
    """log(σ₁/σ_r) with σ_r floored at 1e-6·σ₁: 0 when flat, at most log(1e6) ≈ 13.8. Only σ₁ and σ_r get gradient."""
    top = s.amax(-1)
    return -torch.log(s.amin(-1) / top + LOG_CONDITION_FLOOR) + math.log1p(LOG_CONDITION_FLOOR)


@_masked
def inv_stable_rank(s: torch.Tensor) -> torch.Tensor:
    """σ₁²/Σσ² = 1/stable rank: 1 for rank one, minimal 1/r when flat. Pushes only against the top direction
    relative to the total energy (a smooth-ish stand-in for the spectral norm)."""
    return s.amax(-1).square() / s.square().sum(-1)


@_masked
def neg_effective_rank(s: torch.Tensor) -> torch.Tensor:
    """−exp(H)/r: −1/r for rank one, minimal −1 when flat (the effective rank as a fraction of r)."""
    return -_entropy(s).exp() / s.shape[-1]


PENALTIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "frob_nuclear_ratio": frob_nuclear_ratio,
    "neg_entropy": neg_entropy,
    "log_condition": log_condition,
    "inv_stable_rank": inv_stable_rank,
    "neg_effective_rank": neg_effective_rank,
}
"""Every penalty is minimised by a flat spectrum and is 0 (gradient 0) for an all-zero spectrum."""


def get_penalty(form: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The penalty function named ``form`` (a key of :data:`PENALTIES`), with a clear error for unknown names."""
    try:
        return PENALTIES[form]
    except KeyError:
        raise ValueError(f"unknown spectral penalty form {form!r}; choose one of {sorted(PENALTIES)}") from None


# --------------------------------------------------------------------------------------------------------------------
# walking a peft model
# --------------------------------------------------------------------------------------------------------------------

# Wrapper prefixes that FSDP / activation checkpointing / torch.compile insert into module names.
_WRAPPER_PARTS = re.compile(r"(?:^|(?<=\.))(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod|module)\.")


def short_module_name(name: str) -> str:
    """A readable, stable name for a LoRA module path: peft's ``base_model.model.`` prefix and FSDP/checkpoint
    wrapper parts removed, e.g. ``model.layers.3.self_attn.q_proj``."""
    name = _WRAPPER_PARTS.sub("", name + ".").rstrip(".")
    return name.removeprefix("base_model.model.")


def _full(weight: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a possibly sharded parameter. FSDP2 / ``fully_shard`` (Lightning's ModelParallelStrategy)
    stores DTensors; ``full_tensor()`` all-gathers them and is differentiable (its backward reduce-scatters), so a
    penalty computed from it trains the shards. It is a collective: every rank must call it, in the same order."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return weight
    return weight.full_tensor() if isinstance(weight, DTensor) else weight


LoRARef = tuple[str, str, torch.nn.Module, str]
"""``(name, proj_type, layer, adapter)``: where one adapter lives, as found by :func:`find_lora_layers`."""


def find_lora_layers(model: torch.nn.Module) -> list[LoRARef]:
    """Every (peft ``LoraLayer``, adapter) pair of ``model`` with a 2-D (Linear) adapter, in module order.

    Walking ``named_modules`` of a 30-layer model takes ~8 ms; callbacks that read the adapters every step find them
    once and pass the result to :func:`iter_lora_modules` (modules and adapters do not change during a fit).
    ``name`` is :func:`short_module_name` of the module path (``:<adapter>`` appended when the layer holds several
    adapters), ``proj_type`` its last component (``q_proj``).
    """
    from peft.tuners.lora import LoraLayer

    refs = []
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapters = [a for a in module.lora_A if a in module.lora_B]
        for adapter in adapters:
            if module.lora_A[adapter].weight.ndim != 2:  # convolution adapters
                continue
            name = short_module_name(path)
            proj = name.rsplit(".", 1)[-1]
            refs.append((f"{name}:{adapter}" if len(adapters) > 1 else name, proj, module, adapter))
    return refs


def iter_lora_modules(
    model: torch.nn.Module, layers: list[LoRARef] | None = None
) -> Iterator[tuple[str, str, torch.Tensor, torch.Tensor, float]]:
    """Yield ``(name, proj_type, B, A, scale)`` for every active LoRA adapter of every peft ``LoraLayer`` in ``model``.

    ``name`` and ``proj_type`` as in :func:`find_lora_layers` (pass its result as ``layers`` to skip the walk),
    ``B`` (d_out×r) and ``A`` (r×d_in) the weights with their autograd history (wrap in ``torch.no_grad()`` for
    logging), ``scale`` peft's ``scaling[adapter]`` (already α/√r with rsLoRA). Embedding and convolution adapters
    are skipped (not 2-D). With DoRA the magnitude vector is not included: σ describes s·B·A only. Inactive adapters
    and layers disabled with ``disable_adapter()`` are skipped.

    Distributed use:
      * single device and DDP: parameters are whole on every rank; nothing is gathered.
      * FSDP2 (``fully_shard``; DTensor parameters): each weight is all-gathered with ``DTensor.full_tensor()``,
        differentiably. Every rank must run the whole loop (same order), even if only rank zero uses the values.
      * FSDP1 (``FullyShardedDataParallel``, Lightning's FSDPStrategy): parameters are flat shards outside forward;
        wrap the loop in :func:`gathered_full_params` (no autograd through it: logging only).
    None of the distributed paths can be exercised on the single-CPU test machine; they are untested.
    """
    for name, proj, layer, adapter in find_lora_layers(model) if layers is None else layers:
        if getattr(layer, "disable_adapters", False) or adapter not in layer.active_adapters:
            continue
        B = _full(layer.lora_B[adapter].weight)
        A = _full(layer.lora_A[adapter].weight)
        yield name, proj, B, A, float(layer.scaling[adapter])


@contextlib.contextmanager
def gathered_full_params(model: torch.nn.Module):
    """Context in which FSDP1-wrapped parameters are whole (``summon_full_params``, read-only); a no-op otherwise.

    Collective under FSDP1: every rank must enter it. Gradients do not flow through it, so the spectral *penalty*
    cannot be used with FSDP1 (use DDP or FSDP2); the logger can. Untested here (no multi-process GPU run).
    """
    if not uses_fsdp1(model):  # also covers torch built without distributed
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=False, recurse=True):
        yield


def uses_fsdp1(model: torch.nn.Module) -> bool:
    """Whether ``model`` contains FSDP1 (``FullyShardedDataParallel``) units, whose flat shards block autograd."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:
        return False
    return any(isinstance(m, FSDP) for m in model.modules())


def check_not_fsdp1(model: torch.nn.Module) -> None:
    """Raise if ``model`` is wrapped in FSDP1, whose flat shards carry no autograd to the LoRA weights."""
    if uses_fsdp1(model):
        raise RuntimeError("the spectral penalty needs differentiable LoRA weights; FSDP1 shards block that: "
                           "use DDP or FSDP2 (ModelParallelStrategy / fully_shard)")


def lora_spectra(model: torch.nn.Module, layers: list[LoRARef] | None = None) -> dict[str, tuple[str, torch.Tensor]]:
    """``{name: (proj_type, σ)}`` for every LoRA module of ``model``, computed under ``no_grad`` (for logging).

    Collective under FSDP (every rank must call it); cheap under DDP (no communication)."""
    with torch.no_grad(), gathered_full_params(model):
        modules = [(n, p, B.detach(), A.detach(), s) for n, p, B, A, s in iter_lora_modules(model, layers)]
        sigmas: list[torch.Tensor | None] = [None] * len(modules)
        for idx, sigma in grouped_singular_values([(B, A, s) for _, _, B, A, s in modules]):
            for j, i in enumerate(idx):
                sigmas[i] = sigma[j]
    return {name: (proj, sigma) for (name, proj, *_), sigma in zip(modules, sigmas)}


def spectral_penalty(
    model: torch.nn.Module, form: str = "frob_nuclear_ratio", layers: list[LoRARef] | None = None
) -> torch.Tensor:
    """Mean over LoRA modules of the penalty ``form`` of each adapter's spectrum, differentiable in every B and A.

    ``layers``: the result of :func:`find_lora_layers` for ``model``, to skip walking the model on every call.

    All-zero spectra (B = 0) contribute 0 to the sum but still count in the mean. Raises if the model has no LoRA
    modules or is wrapped in FSDP1 (no autograd through its flat shards).
    """
    if layers is None:  # callers passing layers have done this check once (walking the model costs ms)
        check_not_fsdp1(model)
    fn = get_penalty(form)
    factors = [(B, A, scale) for _, _, B, A, scale in iter_lora_modules(model, layers)]
    if not factors:
        raise ValueError("spectral_penalty: the model has no active LoRA modules")
    total = sum(fn(sigma).sum() for _, sigma in grouped_singular_values(factors))
    return total / len(factors)
