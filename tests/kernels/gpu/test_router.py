"""kernels/gpu/router.py::route against runtime.model.Router.route fed the same logits; router_logits
against the Router's own product.

The reference Router gets hidden = E and an identity weight, so its `x.float() @ W.t()` hands it our logits
exactly; it runs on the CPU in fp32. Without CUDA the kernel runs in the Triton interpreter (this folder's
conftest). Wanted: ids equal and in the same order, weights within 1e-6 relative, cpu_ids and counts exact.
Inputs are checked free of near-ties first (the reference's ids must survive a 1e-5 relative nudge of the
logits), since on a near-tie a last-bit difference in exp may rightly pick the other expert.
"""
import dataclasses

import pytest
import torch

from dslocal.kernels.gpu import router
from dslocal.quant.synthetic import PRESETS
from dslocal.runtime.config import GATING_SIGMOID
from dslocal.runtime.model import Router

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
W_TOL = 1e-6         # max |w - w_ref| / |w_ref|
NUDGE = 1e-5         # relative size of the logit perturbations that must not change the reference's ids
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (CUDA graphs)")

V2 = dataclasses.replace(PRESETS["v2-lite"], n_expert=160, n_group=8, n_group_used=3, expert_weights_scale=16.0)
CASES = {   # E, K, gating, groups, norm, scale
    "v2-lite": PRESETS["v2-lite"],      # 64, 6, softmax, none, no norm, 1.0
    "v3": PRESETS["v3"],                # 256, 8, sigmoid, 8 / 4, norm, 2.5
    "v2": V2,                           # 160, 6, softmax, 8 / 3, no norm, 16.0
    "tiny": dataclasses.replace(PRESETS["tiny-v2"], expert_weights_scale=0.0),   # 8, 2, softmax; 0.0: none
    "tiny-v3": PRESETS["tiny-v3"],      # 16, 4, sigmoid, 4 / 2, norm, 2.5
}


def make_router(cfg, seed=0) -> Router:
    """The model's Router for cfg on the CPU, weight = identity (logits in = logits used), random bias."""
    cfg = dataclasses.replace(cfg, hidden=cfg.n_expert)
    r = Router(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        r.weight.copy_(torch.eye(cfg.n_expert))
        # V3's selection bias; the softmax models have none in their files, but the kernel must add any
        r.bias.copy_(0.05 * torch.randn(cfg.n_expert, generator=g))
    return r


def make_logits(r: Router, M, seed):
    """(M, E) logits on which the reference's choice has no near-tie (redrawn until it has none)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(10):
        logits = 1.5 * torch.randn(M, r.cfg.n_expert, generator=g)
        ids = r.route(logits)[0]
        nudged = [logits * (1 + NUDGE * (2 * torch.rand(logits.shape, generator=g) - 1)) for _ in range(3)]
        if all(torch.equal(r.route(x)[0], ids) for x in nudged):
            return logits
    raise AssertionError(f"no tie-free logits from seed {seed}")


def kernel_route(r: Router, logits, cpu_id=None, counts=None):
    cfg = r.cfg
    return router.route(logits.to(DEVICE), r.bias.detach().to(DEVICE), cfg.n_expert_used, cfg.gating,
                        cfg.n_group, cfg.n_group_used, cfg.expert_weights_norm, cfg.expert_weights_scale,
                        cpu_id, counts)


def check_weights(w, w_ref, what):
    err = ((w.cpu() - w_ref).abs() / w_ref.abs()).max().item()
    print(f"{what}: max rel weight error {err:.2e} (tol {W_TOL:.0e})")
    assert err < W_TOL


@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_router(name, M):
    r = make_router(CASES[name], seed=M)
    E = r.cfg.n_expert
    logits = make_logits(r, M, seed=100 + M)
    with torch.no_grad():
        ids_ref, w_ref, _ = r.route(logits)
    cpu_id = torch.arange(E)
    cpu_id[torch.randperm(E, generator=torch.Generator().manual_seed(M))[: E // 3]] = -1   # on the GPU
    counts = torch.randint(0, 1000, (E,), generator=torch.Generator().manual_seed(M))
    counts_dev = counts.to(DEVICE, copy=True)
    ids, w, cpu_ids = kernel_route(r, logits, cpu_id.to(DEVICE), counts_dev)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert ids.shape == w.shape == (M, r.cfg.n_expert_used)
    assert torch.equal(ids.cpu(), ids_ref), f"{name} M={M}: ids\n{ids.cpu()}\nwant\n{ids_ref}"
    check_weights(w, w_ref, f"{name} M={M}")
    assert torch.equal(cpu_ids.cpu(), cpu_id[ids_ref])
    ones = torch.ones(ids_ref.numel(), dtype=torch.long)
    assert torch.equal(counts_dev.cpu(), counts.scatter_add_(0, ids_ref.flatten(), ones))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []))
@pytest.mark.parametrize("M,E,D", [(1, 64, 2048), (3, 17, 100), (4, 256, 7168), (9, 16, 64)])
def test_router_logits_match_the_router(dtype, M, E, D):
    """x in the model's dtype against Router.logits (x.float() @ W.t()): fp32 sums in another order, so
    within 1e-5 of the largest logit; more rows than a decode step's go to torch."""
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, D + 5, generator=g).to(DEVICE, dtype)[:, :D]          # strided rows
    w = (torch.randn(E, D, generator=g) / D ** 0.5).to(DEVICE)
    want = x.float() @ w.t()
    got = router.router_logits(x, w)
    assert got.shape == (M, E) and got.dtype == torch.float32
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"router_logits {dtype} M{M} E{E} D{D}: {err:.1e}")
    assert err < 1e-5


def test_without_tables_and_strided_rows():
    """No cpu_id or counts: two outputs; logits as the first E columns of a wider (M, E + 5) tensor."""
    r = make_router(CASES["v3"], seed=5)
    logits = make_logits(r, 4, seed=7)
    wide = torch.cat([logits, torch.randn(4, 5)], 1)                                  # (M, E + 5)
    with torch.no_grad():
        ids_ref, w_ref, _ = r.route(logits)
    out = router.route(wide.to(DEVICE)[:, :256], r.bias.detach().to(DEVICE), 8, GATING_SIGMOID, 8, 4, True, 2.5)
    assert len(out) == 2
    assert torch.equal(out[0].cpu(), ids_ref)
    check_weights(out[1], w_ref, "v3 strided rows")


def test_exact_ties_take_the_lowest_index():
    """Equal sel: the kernel's rule (torch.topk promises no order among equal values)."""
    bias = torch.zeros(8, device=DEVICE)
    logits = torch.tensor([[0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]], device=DEVICE)
    ids, w = router.route(logits, bias, 3, GATING_SIGMOID, norm_weights=False)
    assert ids.tolist() == [[1, 3, 4]]
    # four groups of two all hold one 0 and one 1, so their scores tie and group 0 is the one kept
    ids, _ = router.route(logits, bias, 2, GATING_SIGMOID, n_group=4, n_group_used=1)
    assert ids.tolist() == [[1, 0]]


def test_rejects_bad_inputs():
    logits = torch.randn(2, 16, device=DEVICE)
    bias = torch.zeros(16, device=DEVICE)
    with pytest.raises(ValueError, match="logits"):
        router.route(logits.double(), bias, 2, GATING_SIGMOID)
    with pytest.raises(ValueError, match="bias"):
        router.route(logits, bias[:8], 2, GATING_SIGMOID)
    with pytest.raises(ValueError, match="groups"):
        router.route(logits, bias, 2, GATING_SIGMOID, n_group=3, n_group_used=1)
    with pytest.raises(ValueError, match="groups"):
        router.route(logits, bias, 5, GATING_SIGMOID, n_group=4, n_group_used=1)
    with pytest.raises(ValueError, match="counts"):
        router.route(logits, bias, 2, GATING_SIGMOID, counts=torch.zeros(16, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="gating"):
        router.route(logits, bias, 2, 7)


@needs_cuda
def test_cuda_graph_replay():
    """Captured once, replayed on new logits: same ids and weights as eager, counts grow per replay."""
    r = make_router(CASES["v3"], seed=9)
    bias = r.bias.detach().cuda()
    cpu_id = torch.arange(256, device="cuda")
    counts = torch.zeros(256, dtype=torch.long, device="cuda")
    static = torch.zeros(5, 256, device="cuda")
    args = (8, GATING_SIGMOID, 8, 4, True, 2.5, cpu_id, counts)
    router.route(static, bias, *args)                       # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids, w, _ = router.route(static, bias, *args)
    counts.zero_()
    for seed in (1, 2):
        logits = make_logits(r, 5, seed=seed)
        static.copy_(logits)
        graph.replay()
        with torch.no_grad():
            ids_ref, w_ref, _ = r.route(logits)
        assert torch.equal(ids.cpu(), ids_ref)
        check_weights(w, w_ref, f"graph replay {seed}")
    assert counts.sum().item() == 2 * 5 * 8
