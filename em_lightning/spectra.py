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

This module is maths on ``(B, A, scale)``; reading those from a peft model (names, active adapters, FSDP) is
``em_lightning.lora``'s job.

Everything here is written for the all-zero spectrum of LoRA's first step: the ratio metrics (entropy, ranks,
condition number, ‖σ‖₂/‖σ‖₁) are undefined there and read NaN while the norms read 0, penalties are 0 with zero
gradient, and no log, ratio or square root ever sees a zero (unsafe inputs are replaced *before* the unsafe op,
because ``torch.where`` after the op still propagates NaN gradients from the unselected branch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

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
    B: torch.Tensor, A: torch.Tensor, scale: float | torch.Tensor = 1.0, method: str = "gram"
) -> torch.Tensor:
    """The singular values of ``scale * B @ A``, descending, differentiable, without forming the product.

    Args:
        B: the LoRA up-projection, shape (d_out, r) (peft's ``lora_B[adapter].weight``), or a batch (..., d_out, r).
        A: the LoRA down-projection, shape (r, d_in) (peft's ``lora_A[adapter].weight``), or a batch (..., r, d_in);
            must have full row rank (LoRA's random init guarantees it).
        scale: the adapter scaling s (peft's ``scaling[adapter]``: α/r, or α/√r with rsLoRA); a tensor of the batch
            shape for batched inputs.
        method: ``gram`` (Cholesky of A·Aᵀ, eigenvalues of the r×r Gram matrix in float64; batched kernels only,
            values below 1e-7·σ₁ read 0) or ``qr`` (QR of Aᵀ, SVD of B·R_Aᵀ; exact, slow on GPU).
            ``gram`` needs r ≤ d_in (A·Aᵀ invertible) and falls back to ``qr`` otherwise. See the module
            docstring.

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
    if method not in ("qr", "gram"):
        raise ValueError(f"lora_singular_values: method must be gram or qr, got {method!r}")
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
    factors: list[tuple[torch.Tensor, torch.Tensor, float]], method: str = "gram"
) -> list[tuple[list[int], torch.Tensor]]:
    """Singular values of many adapters at once: ``factors`` is a list of ``(B, A, scale)``; adapters with equal
    shapes, dtype and device are stacked and decomposed as one batch (a model has ~5 distinct shapes, so ~5 batched
    QR/SVD calls instead of one per module: far fewer kernel launches and Python round trips).

    Returns ``[(indices, sigma)]``, ``sigma`` of shape (len(indices), r), row j belonging to ``factors[indices[j]]``.
    Differentiable like :func:`lora_singular_values` (stacking copies the weights but keeps their autograd history).
    """
    out = []
    for idx in _shape_groups(factors):
        if len(idx) == 1:
            B, A, scale = factors[idx[0]]
            out.append((idx, lora_singular_values(B, A, scale, method).unsqueeze(0)))
            continue
        B = torch.stack([factors[i][0] for i in idx])
        A = torch.stack([factors[i][1] for i in idx])
        scale = torch.tensor([float(factors[i][2]) for i in idx], dtype=torch.float64)
        out.append((idx, lora_singular_values(B, A, scale, method)))
    return out


def _shape_groups(factors: list[tuple[torch.Tensor, torch.Tensor, float]]) -> list[list[int]]:
    """Indices of ``factors`` grouped by equal B and A shapes, dtypes and device (one batch each)."""
    groups: dict[tuple, list[int]] = {}
    for i, (B, A, _) in enumerate(factors):
        groups.setdefault((tuple(B.shape), tuple(A.shape), B.dtype, A.dtype, B.device), []).append(i)
    return list(groups.values())


# ------------------------------------------------------------------------------------------------------------
# singular subspaces (how the adapter's directions move between two logged steps)
# ------------------------------------------------------------------------------------------------------------

SUBSPACE_FLOOR = 1e-6
"""The top-k singular subspaces of ΔW count as defined when σ_k > ``SUBSPACE_FLOOR``·σ₁ (so never for B = 0,
nor when ΔW has rank < k); below that the k-th direction is not determined by ΔW (or only by round-off)."""


class LoRASubspaces(NamedTuple):
    """Orthonormal bases of the top-k singular subspaces of ΔW = s·B·A (see :func:`lora_singular_subspaces`).

    ``left``: (..., d_out, k), the top-k left singular vectors (the output directions ΔW writes to);
    ``right``: (..., d_in, k), the top-k right singular vectors (the input directions ΔW reads);
    ``defined``: (...,) bool, σ_k > ``SUBSPACE_FLOOR``·σ₁; where False both bases are zeros.
    """

    left: torch.Tensor
    right: torch.Tensor
    defined: torch.Tensor


def lora_singular_subspaces(B: torch.Tensor, A: torch.Tensor, k: int | None = None) -> LoRASubspaces:
    """Orthonormal bases of the top-k left and right singular subspaces of ΔW = s·B·A, without forming ΔW.

    The subspaces do not depend on the scale s (nor its sign), so it is not an argument. Works in float64 on
    the factors' device with batched matrix products and r×r eigendecompositions only, O((d_out + d_in)·r²):

        A·Aᵀ = W Λ Wᵀ (eigh)  ⇒  A = W Λ^½ Q_Aᵀ with Q_A = Aᵀ W Λ^-½ (d_in×r, orthonormal columns)
        ⇒ B·A = M Q_Aᵀ with M = B W Λ^½ (d_out×r);   MᵀM = V Σ² Vᵀ (eigh, σ descending)
        ⇒ left singular vectors M V Σ⁻¹, right singular vectors Q_A V; keep the first k columns.

    This is the SVD of the small core of ΔW that QR of B and Aᵀ would give (left Q_B U, right Q_A V), without
    QR: on a GPU a batch of tall QRs runs one cuSOLVER call per matrix, eigendecompositions of r×r matrices
    are batched, and the only d-sized work is four products: A·Aᵀ, Bᵀ·B, and the bases as B and Aᵀ times r×k
    coefficients. Directions of A with √λ ≤ ``GRAM_FLOOR``·√λ_max are dropped (exact for a rank-deficient A:
    they carry no part of ΔW), and both bases get one Cholesky-QR pass (in r-space, from the same Gram
    matrices), so a basis compared with itself gives cosines of 1 to round-off. Round-off in the directions
    grows like 1e-16·σ₁²/(σ_k² − σ_{k+1}²): a subspace whose k-th singular value is close to the next one is
    ill-conditioned (intrinsically, not through this method); the whole column and row space (k = r) is
    determined for any spectrum.

    Args:
        B: (..., d_out, r).  A: (..., r, d_in).
        k: subspace dimension; default (None) r; at most min(r, d_out, d_in) (larger values are clamped).

    Returns:
        :class:`LoRASubspaces` with k columns, float64; ``defined`` False (bases zero, no error) where σ_k ≤
        ``SUBSPACE_FLOOR``·σ₁: B = 0 (LoRA's start), or ΔW of rank < k.
    """
    if B.ndim < 2 or A.ndim < 2 or B.shape[-1] != A.shape[-2]:
        raise ValueError(f"lora_singular_subspaces expects B (..., d_out, r) and A (..., r, d_in), got "
                         f"shapes {tuple(B.shape)} and {tuple(A.shape)}")
    r = B.shape[-1]
    k = min(r if k is None else k, r, B.shape[-2], A.shape[-1])
    if k < 1:
        raise ValueError(f"lora_singular_subspaces: k must be >= 1, got {k}")
    with torch.autocast(device_type=B.device.type, enabled=False):
        B, A = B.to(torch.float64), A.to(torch.float64)
        gram_A, gram_B = A @ A.mT, B.mT @ B  # with the two products below, the only d-sized work
        lam, W = torch.linalg.eigh(gram_A)  # ascending
        root = lam.clamp_min(0).sqrt()
        keep = root > GRAM_FLOOR * root[..., -1:]
        root = torch.where(keep, root, torch.zeros_like(root))
        safe = torch.where(keep, root, torch.ones_like(root))
        inv_root = torch.where(keep, 1 / safe, torch.zeros_like(root))
        P = W * root.unsqueeze(-2)  # M = B·P (M = B W Λ^½)
        mu, V = torch.linalg.eigh(P.mT @ gram_B @ P)  # MᵀM = V Σ² Vᵀ
        sigma, V = mu.flip(-1).clamp_min(0).sqrt(), V.flip(-1)[..., :k]
        defined = sigma[..., k - 1] > SUBSPACE_FLOOR * sigma[..., 0]  # False for B = 0 (0 > 0)
        top = torch.where(defined.unsqueeze(-1), sigma[..., :k], torch.ones_like(sigma[..., :k]))
        # left = B·(P V Σ⁻¹), right = Aᵀ·(W Λ^-½ V): r×k coefficients on the factors' columns
        left = _orthonormal_coefficients(P @ (V / top.unsqueeze(-2)), gram_B, defined)
        right = _orthonormal_coefficients((W * inv_root.unsqueeze(-2)) @ V, gram_A, defined)
        return LoRASubspaces(B @ left, A.mT @ right, defined)


def _orthonormal_coefficients(C: torch.Tensor, gram: torch.Tensor, defined: torch.Tensor) -> torch.Tensor:
    """C (..., r, k) with F·C's columns made orthonormal by one Cholesky-QR pass done in r-space (F of Gram
    matrix ``gram`` = FᵀF, r×r): C·L⁻ᵀ with L·Lᵀ = Cᵀ·gram·C; zeros where not ``defined``."""
    k = C.shape[-1]
    L, _ = torch.linalg.cholesky_ex(C.mT @ gram @ C)  # ≈ I already, up to the eigendecompositions' round-off
    mask = defined[..., None, None]
    L = torch.where(mask, L, torch.eye(k, dtype=L.dtype, device=L.device))
    C = torch.linalg.solve_triangular(L, C.mT, upper=False).mT
    return torch.where(mask, C, torch.zeros_like(C))


def grouped_singular_subspaces(
    factors: list[tuple[torch.Tensor, torch.Tensor, float]], k: int | None = None
) -> list[tuple[list[int], LoRASubspaces]]:
    """:func:`lora_singular_subspaces` of many adapters, ``factors`` a list of ``(B, A, scale)`` (scale
    unused), stacked by shape as in :func:`grouped_singular_values` (same groups, same order). Returns
    ``[(indices, subspaces)]``, the bases of shape (len(indices), d, k)."""
    out = []
    for idx in _shape_groups(factors):
        B = torch.stack([factors[i][0] for i in idx])
        A = torch.stack([factors[i][1] for i in idx])
        out.append((idx, lora_singular_subspaces(B, A, k)))
    return out


def principal_cosines(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spans of X and Y, (..., d, k) each with orthonormal
    columns: the singular values of the k×k matrix XᵀY (never a d×d product), descending (smallest angle
    first), clipped to [0, 1]. 1 for an unchanged subspace, 0 for orthogonal directions; mean of their squares
    = ‖XᵀY‖²_F / k, the subspace overlap. Angles: ``torch.arccos``; near 0 it turns float64 round-off in the
    cosine (~1e-14) into ~1e-7 rad (~1e-5°)."""
    return torch.linalg.svdvals(X.mT @ Y).clamp(0.0, 1.0)


def abs_cosine(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """|cos| of the angle between vectors u and v along the last dimension (batched), float64; NaN where
    either is zero (e.g. B = 0 at LoRA's start). Sign-blind, as a rank-1 adapter's B and A can flip sign
    together without changing ΔW."""
    u, v = u.to(torch.float64), v.to(torch.float64)
    norms = torch.linalg.vector_norm(u, dim=-1) * torch.linalg.vector_norm(v, dim=-1)
    ok = norms > 0
    cos = (u * v).sum(-1).abs() / torch.where(ok, norms, torch.ones_like(norms))
    return torch.where(ok, cos.clamp(max=1.0), torch.full_like(cos, math.nan))


SUBSPACE_METRICS = ("subspace_left_cos2", "subspace_right_cos2")
"""Per adapter: mean cos² of the k principal angles between its top-k left (output) / right (input) singular
subspaces now and at the previous tracked step (1: unchanged, 0: orthogonal)."""
RANK1_METRICS = ("rank1_A_abs_cos", "rank1_B_abs_cos")
"""Per rank-1 adapter: |cos| between its A (B) vector now and at the previous tracked step."""


class SubspaceStep(NamedTuple):
    """What :meth:`SubspaceTracker.update` found at one step, on the host.

    ``metrics``: {metric: float64 array over the adapters} (NaN where undefined); ``applies``: {metric: bool mask
    of the adapters it exists for} (the rank-1 metrics); ``record``: fields for a JSONL line, ``subspace_k``,
    ``subspace_prev_step`` and ``subspace: {name: {"left": [θ₁…θ_k] | None, "right": …, ("A_abs_cos",
    "B_abs_cos")}}``, principal angles in degrees.
    """

    metrics: dict
    applies: dict
    record: dict


class SubspaceTracker:
    """How far each adapter's top-k singular subspaces of ΔW (and, for rank 1, its A and B vectors) turned since
    the previous :meth:`update`, from the factors (:func:`lora_singular_subspaces`; ΔW is never formed).

    Keeps the previous step's bases (8·k·(d_out + d_in) bytes per adapter, on the adapters' device) and nothing
    else; :meth:`reset` forgets them, so the next values are NaN. Adapters are matched by the names of their
    shape group (the same modules give the same groups every step).
    """

    def __init__(self, k: int):
        self.k = k
        self.reset()

    def reset(self) -> None:
        # {module names of a shape group: {"sub": LoRASubspaces, "B", "A": rank-1 vectors}} at self.step
        self._previous: dict[tuple[str, ...], dict] = {}
        self.step: int | None = None

    def update(self, names: list[str], factors: list[tuple[torch.Tensor, torch.Tensor, float]],
               step: int) -> SubspaceStep:
        """Principal angles between each adapter's top-k subspaces now and at the previous update (and rank-1
        |cos| of A and B), computed on the adapters' device with one host copy; keeps this step's bases."""
        import numpy as np

        current, parts, layout = {}, [], []
        for idx, sub in grouped_singular_subspaces(factors, self.k):
            key = tuple(names[i] for i in idx)
            entry, prev = {"sub": sub}, self._previous.get(key)
            parts += [c.flatten() for c in _subspace_cosines(prev, sub)]
            rank1 = factors[idx[0]][0].shape[-1] == 1
            if rank1:  # copies (float64): the optimizer updates the parameters in place
                entry["B"] = torch.stack([factors[i][0][:, 0] for i in idx]).to(torch.float64)
                entry["A"] = torch.stack([factors[i][1][0] for i in idx]).to(torch.float64)
                have = prev is not None and "B" in prev and prev["B"].shape == entry["B"].shape
                nan = torch.full((len(idx),), math.nan, dtype=torch.float64, device=sub.left.device)
                parts += [abs_cosine(prev[side], entry[side]) if have else nan for side in "AB"]
            current[key] = entry
            layout.append((idx, sub.left.shape[-1], rank1))
        flat = torch.cat(parts).cpu().numpy()

        n = len(names)
        metrics = {m: np.full(n, np.nan) for m in SUBSPACE_METRICS + RANK1_METRICS}
        rank1_mask = np.zeros(n, dtype=bool)
        per_module: dict[str, dict] = {}
        pos = 0
        for idx, k, rank1 in layout:
            sides = []
            for _ in range(2):
                sides.append(flat[pos: pos + len(idx) * k].reshape(len(idx), k))
                pos += len(idx) * k
            for metric, cos in zip(SUBSPACE_METRICS, sides):
                metrics[metric][idx] = np.square(cos).mean(-1)  # NaN rows stay NaN
            left, right = (_angles(cos) for cos in sides)
            for j, i in enumerate(idx):
                per_module[names[i]] = {"left": left[j], "right": right[j]}
            if rank1:
                rank1_mask[idx] = True
                for metric, field in zip(RANK1_METRICS, ("A_abs_cos", "B_abs_cos")):
                    values = flat[pos: pos + len(idx)]
                    pos += len(idx)
                    metrics[metric][idx] = values
                    for j, i in enumerate(idx):
                        per_module[names[i]][field] = _number(values[j])
        record = {"subspace_k": self.k, "subspace_prev_step": self.step,
                  "subspace": {name: per_module[name] for name in names}}  # adapter order
        self._previous, self.step = current, step
        if not rank1_mask.any():
            for metric in RANK1_METRICS:
                del metrics[metric]
        return SubspaceStep(metrics, {m: rank1_mask for m in RANK1_METRICS}, record)


def _subspace_cosines(prev: dict | None, sub: LoRASubspaces) -> list[torch.Tensor]:
    """[left, right] principal cosines (batch, k) between ``prev``'s bases and ``sub``'s; NaN rows where either
    is undefined or there is no previous step of this shape."""
    if prev is not None and prev["sub"].left.shape == sub.left.shape:
        both = (prev["sub"].defined & sub.defined).unsqueeze(-1)
        return [torch.where(both, principal_cosines(prev["sub"].left, sub.left), math.nan),
                torch.where(both, principal_cosines(prev["sub"].right, sub.right), math.nan)]
    return [torch.full(sub.defined.shape + (sub.left.shape[-1],), math.nan, dtype=torch.float64,
                       device=sub.left.device)] * 2


def _number(x) -> float | None:
    """A float for JSON (6 significant digits), None for NaN (JSON has no NaN)."""
    return None if math.isnan(x) else float(f"{x:.6g}")


def _angles(cos) -> list[list[float] | None]:
    """Principal angles in degrees (rounded to 1e-4°), ascending, from rows of their cosines (a numpy array,
    descending); None for a row that is undefined (NaN). Vectorised: ~1700 values on SmolLM2."""
    import numpy as np

    degrees = np.round(np.degrees(np.arccos(np.clip(cos, 0.0, 1.0))), 4).tolist()
    return [None if undefined else row for row, undefined in zip(degrees, np.isnan(cos).any(-1))]


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


RATIO_METRICS = ("entropy", "effective_rank", "stable_rank", "condition_number", "frob_nuclear_ratio")
"""The metrics of :func:`spectral_metrics` that are ratios of singular values: NaN for an all-zero spectrum."""


def spectral_metrics(sigma: torch.Tensor) -> dict[str, torch.Tensor]:
    """Summary statistics of a spectrum ``sigma`` (shape (..., r), non-negative; any order).

    Returns a dict of tensors of shape ``sigma.shape[:-1]``:
      * ``entropy``: Shannon entropy (nats) of p = σ/Σσ; log r when flat, 0 for rank one.
      * ``effective_rank``: exp(entropy), in [1, r].
      * ``stable_rank``: Σσ²/σ₁², in [1, r].
      * ``condition_number``: σ₁/σ_r, ≥ 1; σ_r is floored at 1e-6·σ₁, so a rank-deficient update reads 1e6.
      * ``frob_nuclear_ratio``: ‖σ‖₂/‖σ‖₁, in [1/√r (flat), 1 (rank one)].
      * ``nuclear_norm``: Σσ.  ``top``: σ₁.  ``frobenius_norm``: ‖σ‖₂.
    For an all-zero spectrum (LoRA's start, B = 0) the norms are 0 and the five ratio metrics are NaN: a ratio of
    zeros is undefined, and any number there (0 used to be returned) lies outside the metric's range and pulls
    means, correlations and fits. Average over the defined values (``nanmean``), as the spectrum logger does.
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
    undefined = {k: torch.full_like(v, math.nan) for k, v in raw.items() if k in RATIO_METRICS}
    return {k: torch.where(nonzero, v, undefined.get(k, torch.zeros_like(v))) for k, v in raw.items()}


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


def mean_penalty(
    factors: list[tuple[torch.Tensor, torch.Tensor, float]], form: str = "frob_nuclear_ratio"
) -> torch.Tensor:
    """Mean over adapters of the penalty ``form`` of each spectrum σ(s·B·A); ``factors`` is a list of
    ``(B, A, scale)`` (from :func:`em_lightning.lora.iter_lora_modules`). Differentiable in every B and A.

    All-zero spectra (B = 0) contribute 0 (and no gradient) but count in the mean: the divisor is the number
    of adapters, whatever their state.
    """
    fn = get_penalty(form)
    if not factors:
        raise ValueError("mean_penalty: no adapters given (the model has no active LoRA modules)")
    return sum(fn(sigma).sum() for _, sigma in grouped_singular_values(factors)) / len(factors)
