"""SwiGLU's elementwise step of a decode step's few rows on the CPU (Numba; runtime/model.py MLP is the reference).

    swiglu(g, u, h)      # h = silu(g) * u, float32 rows (M, F)

The dense FFN's and the shared experts' middle step in the compiled decode step of a model run on the CPU
(offload/cpu_step.py), between their gate / up products and their down product.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def swiglu(g, u, h):
    """h = g / (1 + exp(-g)) * u elementwise, float32 arrays of one shape (M, F)."""
    for i in range(g.shape[0]):
        for f in range(g.shape[1]):
            a = g[i, f]
            h[i, f] = a / (np.float32(1.0) + np.float32(math.exp(-a))) * u[i, f]
