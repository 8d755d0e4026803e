"""RMSNorm of a decode step's few rows on the CPU (Numba; runtime/model.py RMSNorm is the reference).

    y = rms_norm(x, weight, eps)     # x (..., D) torch, at most MAX_ROWS rows -> (..., D) as x's dtype
    rms_rows(x, w, eps, out)         # numpy float32 (M, D) -> out
    add_rms(x, a, w, eps, out)       # x += a, then out = rms_rows(x)

One compiled call in place of torch's eight small operators, twice a layer in a decode step of a model run
on the CPU: 1.4-1.6 ms of a 42-48 ms step on the GPU box (kernels/cpu/NOTES.md); `rms_into` is the same for
one row inside other kernels (kernels/cpu/mla.py latent_in).
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit

MAX_ROWS = 4     # longer inputs (prompts) stay with torch, whose operators use every thread


@njit(inline="always")
def rms_into(src, w, eps, dst):
    """dst = src / sqrt(mean(src^2) + eps) * w for one row (1-D float32 arrays), the products in torch's
    order: (src * inv) * w."""
    n = src.shape[0]
    ss = np.float32(0.0)
    for c in range(n):
        ss += src[c] * src[c]
    inv = np.float32(1.0) / np.sqrt(ss / np.float32(n) + np.float32(eps))
    for c in range(n):
        dst[c] = src[c] * inv * w[c]


@njit(cache=True, nogil=True)
def add_rms(x, a, w, eps, out):
    """x += a, then out = RMSNorm(x) * w, row by row (float32 (M, D)): a residual add and the norm after it,
    in one call (offload/cpu_step.py)."""
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            x[i, c] += a[i, c]
        rms_into(x[i], w, eps, out[i])


@njit(cache=True, nogil=True)
def rms_rows(x, w, eps, out):
    """out = RMSNorm(x) * w, row by row (float32 (M, D))."""
    for i in range(x.shape[0]):
        rms_into(x[i], w, eps, out[i])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D) on the CPU, at most MAX_ROWS rows of D values, normed and scaled by weight (D,) float32."""
    rows = x.detach().reshape(-1, x.shape[-1]).float().numpy()
    if rows.shape[0] > MAX_ROWS:
        raise ValueError(f"rms_norm takes at most {MAX_ROWS} rows, got {rows.shape[0]}")
    out = np.empty(rows.shape, np.float32)
    rms_rows(np.ascontiguousarray(rows), weight.detach().numpy(), eps, out)
    return torch.from_numpy(out).to(x.dtype).view(x.shape)
