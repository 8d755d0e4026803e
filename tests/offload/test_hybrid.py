"""Placements change where experts run, not what the model says: the same greedy tokens from the reference
model, everything on the CPU, experts split between the two sides, and every routed expert on the "GPU".

Without CUDA the GPU side is the CPU device: torch for attention and the Triton kernels of kernels/gpu
through the Triton interpreter, so every code path of offload/hybrid.py runs in CI.
"""
import os

import numpy as np
import pytest
import torch

from dslocal.gui import cli
from dslocal.offload import hotness
from dslocal.offload.cpu_worker import ExpertWorker
from dslocal.kernels.gpu.linear import BlockWeight
from dslocal.offload.hybrid import BlockLinear, OffloadedMoE, OnDevice, load_offloaded, routing_counts
from dslocal.offload.place import Placing, _calibrate, replace_gpu_experts
from dslocal.offload.planner import Budget, Hardware, ModelShape, plan
from dslocal.quant.gguf_file import open_gguf
from dslocal.runtime.config import read_config
from dslocal.runtime.load import default_model
from dslocal.runtime.tokenizer import Tokenizer
from dslocal.runtime.weights import load_model

PROMPTS = ["Once upon a time, Mia the", "What is 12 + 34?", "Sam has 40 coins. Sam gets 17 more"]
N = 24


def placement_for(f, cfg, gpu_experts: int | None, hot=None):
    """CPU only (None), or gpu_experts routed experts per layer on the device, the rest on the CPU."""
    shape = ModelShape.from_gguf(f, cfg)
    if gpu_experts is None:
        return plan(shape, Hardware(gpu_bytes_free=0), Budget())
    return plan(shape, Hardware(), Budget(gpu_bytes=2**40, gpu_experts=gpu_experts, hotness=hot))


@pytest.fixture(scope="module", params=["q8_0", "q4_k"])
def nano(request, tmp_path_factory):
    """The bundled trained model (decisive logits: greedy equality is well posed), Q8_0 and Q4_K."""
    path = default_model()
    if request.param != "q8_0":
        path = str(tmp_path_factory.mktemp("nano") / f"nano-{request.param}.gguf")
        assert cli.main(["quantize", default_model(), path, "--type", request.param]) == 0
    f = open_gguf(path)
    yield path, f, read_config(f), Tokenizer.from_gguf(f)
    f.close()


@pytest.fixture(scope="module")
def reference_tokens(nano, greedy):
    _, f, cfg, tok = nano
    model = load_model(f, cfg, like_llama_cpp=False)
    return {p: greedy.dslocal(model, cfg, tok.encode(p), N) for p in PROMPTS}


CUDA = [pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", ["cpu"] + CUDA)
@pytest.mark.parametrize("gpu_experts, overlap", [(None, False), (None, True), (3, True), (8, False)],
                         ids=["cpu-only", "cpu-worker", "split", "all-gpu"])
def test_every_placement_gives_the_reference_tokens(nano, reference_tokens, greedy, gpu_experts, overlap,
                                                    device):
    _, f, cfg, tok = nano
    prompts, n = PROMPTS, N
    if device == "cpu" and gpu_experts:
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("GPU experts on the CPU device run only in the Triton interpreter (CI without a GPU)")
        prompts, n = PROMPTS[:1], 12      # the interpreter is ~1000x slower than the kernels it runs
    placement = placement_for(f, cfg, gpu_experts)
    worker = ExpertWorker(threads=1, pin_memory=device == "cuda") if overlap else None
    try:
        model = load_offloaded(f, cfg, placement, device, torch.float32, worker)
        moes = [b.ffn for b in model.layers if isinstance(b.ffn, OffloadedMoE)]
        assert moes and all(m.n_gpu == (gpu_experts or 0) for m in moes)
        # on the CPU every linear layer (attention, shared experts, dense FFN, head) decodes from its blocks,
        # on a GPU they keep their blocks there (kernels/gpu/linear.py)
        assert isinstance(model.head, BlockLinear) == (device == "cpu")
        if device == "cuda":    # the head where the plan put it: its blocks on the GPU, or run on the CPU
            assert isinstance(model.head, OnDevice) == (placement.head.device == "cpu")
            assert isinstance(model.head, OnDevice) or isinstance(model.head.weight, BlockWeight)
        for p in prompts:
            got = greedy.dslocal(model, cfg, tok.encode(p), n, device)
            want = reference_tokens[p][:n]
            assert got == want, (p, tok.decode(got), tok.decode(want))
        counts = routing_counts(model)
        n_routed = sum(len(tok.encode(p)) + n - 1 for p in prompts) * cfg.n_expert_used
        assert all(sum(c) == n_routed for c in counts.values())     # every routed pair counted once
    finally:
        if worker is not None:
            worker.close()


@pytest.mark.parametrize("device", ["cpu"] + CUDA)
def test_linear_layers_in_blocks_give_the_dense_logits(nano, device, monkeypatch):
    """A placed model on a GPU keeps its linear layers of block types in their blocks (kernels/gpu/linear.py
    BlockWeight; merged where the model merges projections): the same logits as the dense float32 weights,
    for a prompt (dequantized, then torch) and for decode steps (the GEMV on the blocks)."""
    from dslocal.kernels.gpu import linear as gpu_linear
    from dslocal.kernels.gpu.linear import BlockWeight
    from dslocal.offload.hybrid import put_blocks
    from dslocal.offload.planner import blocks_on_gpu
    from dslocal.runtime.model import LatentCache
    if device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the GPU kernels run on the CPU device only in the Triton interpreter (CI without a GPU)")
        monkeypatch.setattr(gpu_linear, "BLOCK_R", 64)      # the interpreter's cost is per program
    _, f, cfg, tok = nano
    names = blocks_on_gpu(cfg, f.tensors)
    assert {"output.weight", "blk.0.attn_output.weight", "blk.1.ffn_down_shexp.weight"} <= names
    assert not any("k_b" in n or "v_b" in n or "token_embd" in n or "gate_inp" in n for n in names)
    dense = load_model(f, cfg, torch.float32, device, like_llama_cpp=False)
    model = load_model(f, cfg, torch.float32, device, like_llama_cpp=False, leave_out=names)
    put_blocks(model, f, cfg, names, torch.device(device))
    model.merge_projections()
    attn = model.layers[0].attn
    assert isinstance(model.head.weight, BlockWeight) and isinstance(attn.wo.weight, BlockWeight)
    if attn.wq.weight.ggml_type == attn.wkv_a.weight.ggml_type:
        assert isinstance(attn.w_in, BlockWeight) and attn.w_in.blocks.data_ptr() == attn.wq.weight.blocks.data_ptr()
    prompt = tok.encode(PROMPTS[1])
    caches = [LatentCache(cfg, 1, len(prompt) + 4, torch.float32, device) for _ in range(2)]
    with torch.no_grad():
        want, got = (m(torch.tensor([prompt], device=device), c, 0)[0, -1] for m, c in zip((dense, model), caches))
        for i in range(5):
            err = ((got - want).abs().max() / want.abs().max()).item()
            print(f"{'prompt' if i == 0 else f'step {i}'}: max |blocks - dense| / max |dense| {err:.1e}")
            assert err < 1e-5
            if i < 4:
                x = torch.tensor([[int(want.argmax())]], device=device)
                want, got = (m(x, c, len(prompt) + i)[0, -1] for m, c in zip((dense, model), caches))


def test_calibration_places_the_hottest_experts_and_is_stored(nano):
    path, f, cfg, _ = nano
    device = "cuda" if torch.cuda.is_available() else "cpu"     # the CPU device: the Triton interpreter
    model = load_offloaded(f, cfg, placement_for(f, cfg, 2), device, torch.float32, None)
    counts = _calibrate(model, f, cfg, Placing(device, torch.float32, 512), path, log=open(os.devnull, "w"))
    assert hotness.load(path) == counts
    placement = placement_for(f, cfg, 2, hot=counts)
    replace_gpu_experts(model, placement)
    for lp, block in zip(placement.layers, model.layers):
        if isinstance(block.ffn, OffloadedMoE):
            c = np.array(counts[lp.index])
            assert sorted(block.ffn.gpu_ids) == sorted(lp.gpu_experts)
            assert c[list(lp.gpu_experts)].min() >= np.delete(c, list(lp.gpu_experts)).max()


def test_hotness_store_is_keyed_by_the_file(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 10)
    assert hotness.load(str(model)) is None
    hotness.save(str(model), {1: [3, 0, 2]})
    hotness.save(str(model), {1: [1, 1, 1]})               # merged with what is stored
    assert hotness.load(str(model)) == {1: [4, 1, 3]}
    model.write_bytes(b"y" * 11)                            # another file at the same path
    assert hotness.load(str(model)) is None
    with open(hotness.cache_path(str(model)), "w") as fh:
        fh.write("{not json")
    assert hotness.load(str(model)) is None                 # unreadable: measured again


@pytest.mark.skipif(not torch.cuda.is_available(), reason="streaming prefill needs CUDA")
@pytest.mark.parametrize("registered", [False, True])
def test_long_prompt_streams_the_cpu_experts(nano, greedy, registered):
    """A prompt of STREAM_MIN_TOKENS or more computes the CPU experts on the GPU (offload/prefill.py):
    same tokens as the reference, and the stream was used; with the experts' pages registered with CUDA
    (as --pull-experts does) the copies read the file's map directly, through no pinned buffer."""
    from dslocal.offload.place import attach_pull
    from dslocal.offload.prefill import STREAM_MIN_TOKENS
    _, f, cfg, tok = nano
    prompt = tok.encode(" ".join(PROMPTS * 20))
    assert len(prompt) >= STREAM_MIN_TOKENS
    want = greedy.dslocal(load_model(f, cfg, like_llama_cpp=False), cfg, prompt, 8)
    worker = ExpertWorker(threads=2)
    try:
        model = load_offloaded(f, cfg, placement_for(f, cfg, 3), "cuda", torch.float32, worker)
        if registered:
            assert attach_pull(model, 1, torch.device("cuda")) > 0
        streamer = next(b.ffn.streamer for b in model.layers if isinstance(b.ffn, OffloadedMoE))
        assert streamer is not None and streamer.units
        assert greedy.dslocal(model, cfg, prompt, 8, "cuda") == want
        assert streamer._stream is not None        # the stream was used
        assert all((buffer.numel() == 0) == registered for buffer, _ in streamer._staging)   # pinned buffers
        assert streamer._pool is None              # and its copy thread ended with the prompt
        streamer.close()
    finally:
        worker.close()


def test_the_planner_counts_what_the_gpu_kernels_keep():
    """planner.KEEP_ON_GPU (GGUF bytes on the GPU) must name the block types kernels/gpu/moe.py keeps."""
    from dslocal.kernels.gpu.moe import KEEP_BLOCKS
    from dslocal.offload.planner import KEEP_ON_GPU
    from dslocal.quant.ggml import GGMLType as T
    assert KEEP_ON_GPU - {T.F32, T.F16, T.BF16} == KEEP_BLOCKS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("gpu_experts, pull", [(0, 0), (3, 0), (8, 0), (0, 1), (3, 1), (0, 2), (0, "tuned")])
def test_decode_steps_replayed_as_cuda_graphs_give_the_reference_tokens(nano, reference_tokens, gpu_experts, pull,
                                                                        monkeypatch):
    """offload/graphs.py: the first step runs eagerly and captures, later steps replay; same tokens. pull:
    that many of each token's CPU experts read by the GPU from the file's memory (kernels/gpu/pull.py), or
    "tuned": the count changed between replays of one capture (offload/pulltune.py, rounds of one step)."""
    from dslocal.offload import pulltune
    from dslocal.offload.graphs import GraphedDecoder
    from dslocal.offload.place import attach_pull
    from dslocal.runtime.model import LatentCache
    _, f, cfg, tok = nano
    worker = ExpertWorker(threads=2) if gpu_experts < cfg.n_expert else None
    monkeypatch.setattr(pulltune, "WARMUP_STEPS", 0)
    monkeypatch.setattr(pulltune, "SAMPLES", 1)
    monkeypatch.setattr(pulltune, "MAX_ROUNDS", 1000)
    try:
        model = load_offloaded(f, cfg, placement_for(f, cfg, gpu_experts), "cuda", torch.float32, worker)
        if pull == "tuned":
            assert attach_pull(model, 1, torch.device("cuda"), cfg.n_expert_used, tune=True) > 0
        elif pull:
            assert attach_pull(model, pull, torch.device("cuda")) > 0
        for p in PROMPTS:
            prompt = tok.encode(p)
            cache = LatentCache(cfg, 1, len(prompt) + N, torch.float32, "cuda")
            step = GraphedDecoder(model, cache, worker, "cuda")
            with torch.inference_mode():
                logits = model(torch.tensor([prompt], device="cuda"), cache, 0)[0, -1]
                got = []
                for i in range(N):
                    got.append(int(logits.argmax()))
                    logits = step(got[-1], len(prompt) + i)
            assert got == reference_tokens[p], (p, tok.decode(got))
            n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layer))
            assert step.graphs is not None and step.graphs.graph is not None
            assert len(step.graphs.handoffs) == (n_moe if worker else 0)     # one hand-off per MoE layer
            assert step.graphs.steps == (N - 1 if worker else 0)             # every step after the first replayed
            if pull == "tuned":
                assert len({n for r in step.graphs.tuner.rounds for n in r}) >= 2   # more than one count ran
    finally:
        if worker is not None:
            worker.close()
