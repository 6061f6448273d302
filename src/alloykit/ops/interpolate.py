"""Interpolation on flat vectors and on the sphere: the shared parts of SLERP-like merges."""

from __future__ import annotations

import torch


def lerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """(1 - t) a + t b."""
    return (1 - t) * a + t * b


def slerp_flat(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two tensors treated as single flat vectors.

    theta = arccos(<a/|a|, b/|b|>);  slerp = sin((1-t) theta)/sin theta * a + sin(t theta)/sin theta * b.
    Nearly colinear or antipodal pairs (|cos theta| > dot_threshold) fall back to lerp;
    norms at or below eps count as 1 (Shoemake 1985).
    """
    fa, fb = a.reshape(-1), b.reshape(-1)
    if fa.numel() == 0:
        return lerp(a, b, t)
    na, nb = torch.linalg.vector_norm(fa), torch.linalg.vector_norm(fb)
    na = torch.where(na > eps, na, torch.ones_like(na))
    nb = torch.where(nb > eps, nb, torch.ones_like(nb))
    dot = ((fa / na) * (fb / nb)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return lerp(a, b, t)
    theta = torch.acos(dot)
    s = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / s) * a + (torch.sin(t * theta) / s) * b


def slerp_rows(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of corresponding rows (the last dimension is the vector).

    Each row pair gets its own angle; rows whose cos^2 theta is 1 within eps^2 use lerp.
    """
    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = (unit(a) * unit(b)).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return torch.where(colinear, lerp(a, b, t), spherical)
