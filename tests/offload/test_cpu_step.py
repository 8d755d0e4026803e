"""A decode step of a model on the CPU as compiled calls (offload/cpu_step.py) computes what the model's modules
compute: the same logits within float rounding, the same latent cache and the same routing counts; its
router, residual norms and SwiGLU against the torch code they replace."""
import dataclasses

import numpy as np
import pytest
import torch

from dslocal.kernels.cpu import act, norm, router
from dslocal.offload.cpu_step import CPUStep, cpu_step
from dslocal.offload.cpu_worker import ExpertWorker
from dslocal.offload.hybrid import load_offloaded, routing_counts
from dslocal.offload.planner import Budget, Hardware, ModelShape, plan
from dslocal.quant import synthetic
from dslocal.quant.gguf_file import open_gguf
from dslocal.runtime.config import GATING_SIGMOID, GATING_SOFTMAX, read_config
from dslocal.runtime.load import RunConfig, default_model, load
from dslocal.runtime.model import LatentCache, RMSNorm, Router
from dslocal.runtime.weights import load_model

# Relative error of a step's logits, and largest cache difference against the cache's largest value. F32
# files: the float sums' order only (measured 2.6-4.1e-7 per step, tiny-v3). Quantized files: mostly the same
# bits (0 to 2.9e-7), but an activation rounded to 8 or 11 bits lands a quantum apart where a value an ulp
# apart sits at a rounding boundary (the router's products, exp in SwiGLU are not torch's): tiny-v2 Q8_0 from
# its 7th step on 0.9-1.3e-3, one latent in the cache 4.6e-4 of the largest.
BOUNDS = {"f32": (1e-5, 1e-5), "q8_0": (5e-3, 2e-3), "q4_k_m": (5e-3, 2e-3)}


def cpu_model(path: str, dtype=torch.float32, worker=None):
    f = open_gguf(path)
    cfg = read_config(f)
    placement = plan(ModelShape.from_gguf(f, cfg), Hardware(gpu_bytes_free=0), Budget())
    return f, cfg, load_offloaded(f, cfg, placement, "cpu", dtype, worker)


@pytest.mark.parametrize("preset, ftype", [("tiny-v2", "q8_0"), ("tiny-v3", "q4_k_m"), ("tiny-v3", "f32")])
def test_steps_give_the_module_paths_logits_cache_and_counts(tiny_gguf, preset, ftype):
    f, cfg, model = cpu_model(tiny_gguf(preset, ftype))
    caches = [LatentCache(cfg, 1, 40, torch.float32, "cpu") for _ in range(2)]
    step = cpu_step(model, caches[1])
    assert isinstance(step, CPUStep)
    prompt = torch.randint(0, cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for cache in caches:
            model.hidden(prompt[:, :-1], cache, 0)
        token, pos = int(prompt[0, -1]), prompt.shape[1] - 1
        for _ in range(12):
            before = routing_counts(model)
            want = model.next_logits(torch.tensor([[token]]), caches[0], pos)
            middle = routing_counts(model)
            got = step(token, pos)
            after = routing_counts(model)
            err = float((got - want).norm() / want.norm())
            assert err < BOUNDS[ftype][0], (pos, err)
            for i in before:      # the same experts chosen, and counted for offload/hotness.py
                assert np.array_equal(np.subtract(after[i], middle[i]), np.subtract(middle[i], before[i]))
                assert sum(after[i]) - sum(middle[i]) == cfg.n_expert_used
            token, pos = int(want.argmax()), pos + 1
    assert caches[1].length == pos
    for a, b in ((caches[0].kv, caches[1].kv), (caches[0].pe, caches[1].pe)):
        assert float((a - b).abs().max()) <= BOUNDS[ftype][1] * float(a.abs().max())
    f.close()


def test_steps_past_the_cache_are_refused(tiny_gguf):
    f, cfg, model = cpu_model(tiny_gguf("tiny-v2", "q8_0"))
    step = cpu_step(model, LatentCache(cfg, 1, 16, torch.float32, "cpu"))
    with pytest.raises(ValueError, match="do not fit the cache of 16"):
        step(3, 16)
    f.close()


def test_models_not_laid_out_for_it_keep_the_module_path(tiny_gguf):
    path = tiny_gguf("tiny-v2", "q8_0")
    f, cfg, model = cpu_model(path)
    assert cpu_step(model, LatentCache(cfg, 1, 16, torch.bfloat16, "cpu")) is None     # cache not float32
    assert cpu_step(model, LatentCache(cfg, 2, 16, torch.float32, "cpu")) is None      # two sequences
    model.layers[0].attn.wo = model.layers[0].attn.wo.dense                            # a layer without blocks
    assert cpu_step(model, LatentCache(cfg, 1, 16, torch.float32, "cpu")) is None
    f.close()
    f, cfg, model = cpu_model(path, torch.bfloat16)
    assert cpu_step(model, LatentCache(cfg, 1, 16, torch.float32, "cpu")) is None      # bf16 weights
    f.close()
    worker = ExpertWorker(threads=1)
    try:
        f, cfg, model = cpu_model(path, worker=worker)
        assert cpu_step(model, LatentCache(cfg, 1, 16, torch.float32, "cpu")) is None  # experts on a worker
        f.close()
    finally:
        worker.close()


def test_the_engine_on_the_cpu_decodes_the_reference_tokens(greedy):
    """`dslocal run --cpu-only` takes the compiled step, and its greedy tokens are the reference model's."""
    engine = load(default_model(), RunConfig(cpu_only=True, context=128)).engine
    assert isinstance(engine.decode_step, CPUStep)
    with open_gguf(default_model()) as f:
        cfg = read_config(f)
        reference = load_model(f, cfg, like_llama_cpp=False)
    for text in ["What is 12 + 34?", "Once upon a time, Mia the"]:
        prompt = engine.tokenizer.encode(text)
        got = []
        logits = engine._prefill(prompt, 0)
        for i in range(16):
            got.append(int(logits.argmax()))
            logits = engine._forward(got[-1:], len(prompt) + i)
        assert got == greedy.dslocal(reference, cfg, prompt, 16), text


ROUTERS = {   # (E, K, gating, groups, groups used, norm, scale): V2-Lite, V2, V3 and a softmax with groups
    "v2-lite": (64, 6, GATING_SOFTMAX, 1, 1, False, 1.0),
    "v2": (160, 6, GATING_SOFTMAX, 8, 3, False, 16.0),
    "v3": (256, 8, GATING_SIGMOID, 8, 4, True, 2.5),
    "sigmoid-no-groups": (16, 4, GATING_SIGMOID, 1, 1, True, 0.0),
}


@pytest.mark.parametrize("kind", list(ROUTERS))
def test_route_chooses_as_the_router(kind):
    E, K, gating, groups, used, weights_norm, scale = ROUTERS[kind]
    cfg = dataclasses.replace(synthetic.preset("tiny-v3"), hidden=8, n_expert=E, n_expert_used=K, gating=gating,
                              n_group=groups, n_group_used=used, expert_weights_norm=weights_norm,
                              expert_weights_scale=scale)
    r = Router(cfg)
    g = torch.Generator().manual_seed(E)
    with torch.no_grad():
        r.bias.copy_(torch.randn(E, generator=g) * 0.1 if gating == GATING_SIGMOID else torch.zeros(E))
    x = torch.randn(5, 8, generator=g)
    r.weight.data = torch.randn(E, 8, generator=g)
    with torch.no_grad():
        want_ids, want_w, _ = r.route(x)
        logits = r.logits(x).numpy()
    ids, w = np.empty((5, K), np.int64), np.empty((5, K), np.float32)
    counts = np.zeros(E, np.int64)
    router.route(logits, r.bias.detach().numpy(), gating, groups, used, weights_norm, scale, ids, w, counts)
    assert np.array_equal(ids, want_ids.numpy())
    np.testing.assert_allclose(w, want_w.numpy(), rtol=2e-6)
    assert np.array_equal(counts, np.bincount(ids.ravel(), minlength=E))


def test_residual_norm_and_swiglu_as_torch():
    g = torch.Generator().manual_seed(3)
    x, a = torch.randn(3, 300, generator=g) * 4, torch.randn(3, 300, generator=g)
    m = RMSNorm(300, 1e-6)
    m.weight.data = torch.rand(300, generator=g) + 0.5
    xs, out = x.numpy().copy(), np.empty((3, 300), np.float32)
    norm.add_rms(xs, a.numpy(), m.weight.detach().numpy(), m.eps, out)
    np.testing.assert_allclose(xs, (x + a).numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(out, m(x + a).detach().numpy(), rtol=1e-5, atol=1e-6)
    gate, up = torch.randn(2, 500, generator=g) * 5, torch.randn(2, 500, generator=g)
    h = np.empty((2, 500), np.float32)
    act.swiglu(gate.numpy(), up.numpy(), h)
    want = torch.nn.functional.silu(gate) * up            # MLP.forward's step between its products
    np.testing.assert_allclose(h, want.numpy(), rtol=1e-6, atol=1e-6)
