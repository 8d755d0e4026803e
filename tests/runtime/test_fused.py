"""On CUDA, inference runs the model through kernels/gpu (fused norms with the residual add, rope and the
latent cache write, MLA decode): the same logits as the torch code that training uses, with and without a cache, and autocast
evaluation (mixed dtypes) keeps the torch code. Needs a GPU; the kernels themselves are tested against
their references in tests/kernels/gpu, in CI through the Triton interpreter."""
import dataclasses

import pytest
import torch

from dslocal.quant.synthetic import PRESETS
from dslocal.runtime.model import DeepSeek, LatentCache, fused, init_weights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOL = 1e-4     # max |fused - torch| / max |torch| of the logits, fp32 weights


def model_of(preset: str) -> DeepSeek:
    torch.manual_seed(0)
    m = DeepSeek(dataclasses.replace(PRESETS[preset], vocab_size=256))
    init_weights(m, std=0.05)
    return m.cuda().eval()


@pytest.mark.parametrize("preset", ["tiny-v2", "tiny-v3"])
def test_fused_inference_equals_the_torch_path(preset):
    m = model_of(preset)
    tokens = torch.randint(0, 256, (1, 9), device="cuda")
    want = m(tokens)                                      # grad enabled: the torch code
    with torch.no_grad():
        assert fused(torch.zeros(1, device="cuda"))
        got = m(tokens)
        cache = LatentCache(m.cfg, 1, 16, torch.float32, "cuda")
        first = m(tokens[:, :5], cache, 0)                # prefill, then one token at a time
        steps = [m(tokens[:, i:i + 1], cache, i) for i in range(5, 9)]
    for name, out, ref in [("no cache", got, want), ("prefill", first, want[:, :5]),
                           ("decode", torch.cat(steps, 1), want[:, 5:])]:
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        print(f"{preset} {name}: max rel error {err:.2e} (tol {TOL:.0e})")
        assert err < TOL


def test_autocast_evaluation_keeps_the_torch_path():
    m = model_of("tiny-v3")
    tokens = torch.randint(0, 256, (2, 7), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert not fused(torch.zeros(1, device="cuda"))
        out = m(tokens)
    assert out.shape == (2, 7, 256) and torch.isfinite(out).all()
