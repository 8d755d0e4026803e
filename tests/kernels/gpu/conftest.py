"""Triton kernels run on the GPU when there is one, else on CPU tensors through the Triton interpreter."""
import os

import pytest
import torch

INTERPRET = not torch.cuda.is_available()
if INTERPRET:
    # Read by triton.jit when it decorates a kernel, so it must be set before kernels/gpu is imported.
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def device() -> str:
    """Where test tensors live: 'cuda', or 'cpu' for the interpreter."""
    return "cpu" if INTERPRET else "cuda"
