"""Interpolation on flat vectors and on the sphere: the shared parts of SLERP-like merges.

Everything here is plain tensor math without knowledge of recipes. The reductions
follow the order of operations mergekit 0.1.5 uses, so that the merges built on them
reproduce mergekit's float32 results bit for bit where that is cheap (and within
float rounding everywhere).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

#: entries per chunk when a whole tensor is one vector: bounds the float32 scratch of
#: SLERP's reductions (and fixes their summation order, which is mergekit's)
CHUNK = 1 << 20


def lerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """(1 - t) a + t b."""
    return (1 - t) * a + t * b


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def unit_rows(x: torch.Tensor, floor: float = 1e-7) -> torch.Tensor:
    """x / |x| along the last dimension, norms floored at ``floor`` (zero rows stay zero)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=floor)


def chunked_norm(x: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Euclidean norm of a flat vector, computed as the norm of its chunks' norms."""
    parts = [torch.linalg.vector_norm(x[s : s + chunk]) for s in range(0, x.numel(), chunk)]
    return torch.linalg.vector_norm(torch.stack(parts))


def slerp_flat(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float | torch.Tensor,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """Spherical interpolation of two tensors, each taken as one flat vector.

    cos theta = <a/|a|, b/|b|> (norms at or below ``eps`` count as 1);
    slerp = sin((1-t) theta)/sin theta * a + sin(t theta)/sin theta * b (Shoemake 1985).
    Nearly colinear or antipodal pairs (|cos theta| > dot_threshold) use lerp instead.
    Reductions and the output run ``chunk`` entries at a time (bounded scratch).
    """
    dtype = compute_dtype(a)
    fa, fb = a.reshape(-1), b.reshape(-1)
    tt = torch.as_tensor(t, dtype=dtype, device=a.device)
    if fa.numel() == 0:
        return lerp(a, b, tt).to(a.dtype)
    n = fa.numel()
    na = chunked_norm(fa.to(dtype), chunk)
    nb = chunked_norm(fb.to(dtype), chunk)
    one = torch.ones((), dtype=dtype, device=a.device)
    na = torch.where(na > eps, na, one)
    nb = torch.where(nb > eps, nb, one)
    # normalise before multiplying: the raw dot product of two large tensors can overflow
    dot = torch.stack(
        [((fa[s : s + chunk].to(dtype) / na) * (fb[s : s + chunk].to(dtype) / nb)).sum() for s in range(0, n, chunk)]
    ).sum()
    coef_a, coef_b = slerp_coefficients(dot, tt, dot_threshold)
    out = torch.empty(n, dtype=a.dtype, device=a.device)
    for s in range(0, n, chunk):
        out[s : s + chunk] = coef_a * fa[s : s + chunk].to(dtype) + coef_b * fb[s : s + chunk].to(dtype)
    return out.reshape(a.shape)


def slerp_coefficients(dot: torch.Tensor, t: torch.Tensor, dot_threshold: float = 0.9995) -> tuple[torch.Tensor, torch.Tensor]:
    """(coef_a, coef_b) of ``slerp_flat`` from the cosine ``dot`` of the two unit vectors (a
    0-d tensor; clamped to [-1, 1] here) and t (0-d, the compute dtype)."""
    dot = dot.clamp(-1, 1)
    colinear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(colinear, torch.zeros_like(dot), dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    return coef_a, coef_b


def slerp_rows(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of corresponding vectors along the last dimension.

    Each pair gets its own angle from its unit vectors (norms floored at 1e-7, so a zero
    vector has angle pi/2 to anything); pairs with 1 - cos^2 theta <= eps^2 (colinear or
    antipodal) use lerp.
    """
    cos = (unit_rows(a) * unit_rows(b)).sum(-1, keepdim=True)
    return slerp_rows_apply(a, b, t, *slerp_rows_coefficients(cos, t, eps))


def slerp_rows_coefficients(cos: torch.Tensor, t: float, eps: float = 1e-8) -> tuple[torch.Tensor, ...]:
    """(colinear, sin((1-t) theta), sin(t theta), sin(theta)) of ``slerp_rows`` from the
    cosines of the pairs (clamped to [-1, 1] here)."""
    cos = cos.clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    return colinear, torch.sin((1 - t) * theta), torch.sin(t * theta), torch.sin(theta)


def slerp_rows_apply(a: torch.Tensor, b: torch.Tensor, t: float, colinear: torch.Tensor, sin_a: torch.Tensor,
                     sin_b: torch.Tensor, sin_theta: torch.Tensor) -> torch.Tensor:
    """The interpolated vectors, given ``slerp_rows_coefficients`` (entry by entry)."""
    spherical = (sin_a * a + sin_b * b) / sin_theta
    return torch.where(colinear, lerp(a, b, t), spherical)


def karcher_mean(
    vectors: Sequence[torch.Tensor], alphas: Sequence[float], max_iter: int = 10, tol: float = 1e-5
) -> torch.Tensor:
    """Weighted Karcher (Riemannian) mean of the vectors' directions, times their weighted mean norm.

    u_i = v_i/|v_i| for the vectors with |v_i| > tol (the others give no direction); start
    from m = normalize(sum a_i u_i) (u_1 if that vanishes), then up to ``max_iter`` times
    step along the mean log map
        g = sum a_i theta_i/sin(theta_i) (u_i - cos(theta_i) m),   theta_i = angle(m, u_i)
    (terms with theta_i < tol dropped; stop once |g| < tol) with
        m <- cos|g| m + sin|g| g/|g|,  renormalized.
    The a_i are renormalized over the vectors that have a direction; the scale
    sum_i a_i |v_i| uses every vector. All vectors zero (norms <= tol) give zero.
    """
    if len(vectors) == 1:
        return vectors[0].clone()
    dtype = compute_dtype(vectors[0])
    norms = [torch.linalg.vector_norm(v.to(dtype)) for v in vectors]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(vectors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    units = [(vectors[i] / norms[i]).to(vectors[i].dtype).reshape(-1) for i in valid]

    mean = torch.zeros_like(units[0])
    for w, u in zip(weights, units):
        mean += w * u
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)

    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for w, u in zip(weights, units):
            cos = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            step += w * (theta / torch.sin(theta)) * (u - cos * mean)
        step_norm = torch.linalg.vector_norm(step.to(dtype))
        if step_norm.item() < tol:
            break
        mean = (torch.cos(step_norm) * mean + torch.sin(step_norm) * (step / step_norm)).to(mean.dtype)
        n = torch.linalg.vector_norm(mean.to(dtype))
        if n.item() > tol:
            mean = (mean / n).to(mean.dtype)

    scale = norms[0] * alphas[0]
    for a, n in zip(alphas[1:], norms[1:]):
        scale = scale + a * n
    return (scale * mean).reshape(vectors[0].shape)


def stock_ratio(norms: list[torch.Tensor], dot: Callable[[int, int], torch.Tensor], k: int) -> torch.Tensor:
    """Model Stock's t (Jang et al. 2024, eq. 5) from the task vectors' norms and pairwise dot products (one per
    tensor, or per row): t = K c / (1 + (K-1) c), c the mean pairwise cosine; 0 where the
    denominator vanishes. Shape: the norms' shape plus a trailing 1."""
    cos = []
    for i in range(k):
        for j in range(i + 1, k):
            cos.append((dot(i, j) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    den = 1 + (k - 1) * c
    singular = den.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(c), k * c / torch.where(singular, torch.ones_like(den), den))


def stock_combine(ws: torch.Tensor, base: torch.Tensor, t: torch.Tensor, k: int) -> torch.Tensor:
    """t * (1/K) sum_i theta_i + (1 - t) * base, entry by entry (the average summed in order)."""
    average = ws[0].clone()
    for i in range(1, k):
        average += ws[i]
    average /= k
    return t * average + (1 - t) * base
