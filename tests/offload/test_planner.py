"""offload/planner.py: priorities, monotone in the budget, never over it, hot experts first, CPU bytes per
token, overrides, the refusal; and `dslocal info --gpu-memory`. Shapes come from the presets' tensor tables
with q4_k_m types (no file is written, except the tiny one for the command line)."""
import json

import numpy as np
import pytest

from dslocal.gui import cli
from dslocal.offload import planner
from dslocal.offload.planner import (Budget, Hardware, ModelShape, PlanError, format_plan, gpu_bytes,
                                     parse_size, plan)
from dslocal.quant import synthetic
from dslocal.quant.ggml import GGMLType, nbytes
from dslocal.quant.gguf_file import TensorInfo
from dslocal.runtime.config import tensor_specs

GiB, MiB = 2**30, 2**20


def shape_of(preset: str, **kw) -> ModelShape:
    """The ModelShape of a preset written as q4_k_m, from its tensor table alone."""
    cfg = synthetic.preset(preset, **kw)
    table = {}
    for s in tensor_specs(cfg):
        if s.required or s.name == "output.weight":
            t = synthetic.choose_type(s.name, s.shape, "q4_k_m", cfg.n_layer)
            table[s.name] = TensorInfo(s.name, t, s.shape, 0, nbytes(t, int(np.prod(s.shape))))
    return ModelShape.from_tensors(cfg, table)


@pytest.fixture(scope="module")
def v2l():
    return shape_of("v2-lite")


@pytest.fixture(scope="module")
def v3():
    return shape_of("v3", n_layer=8, n_dense=3)


def on_gpu(p, what):
    """Whether every part `what` (attn, shared, dense, head, embed) of the placement is on the GPU."""
    if what in ("head", "embed"):
        return getattr(p, what).device == "gpu"
    return all(getattr(lp, what).device == "gpu" for lp in p.layers if getattr(lp, what).bytes)


def n_gpu_experts(p):
    return sum(len(lp.gpu_experts) for lp in p.layers)


def minimum(m: ModelShape, ctx=4096):
    with pytest.raises(PlanError) as e:
        plan(m, Hardware(), Budget(gpu_bytes=0, context=ctx))
    return int(str(e.value).split("(")[1].split(" bytes")[0])


def test_shape_matches_the_tensor_table(v2l):
    assert v2l.n_layer == 27 and v2l.n_expert == 64 and v2l.n_expert_used == 6
    assert v2l.kv_bytes_per_token == (512 + 64) * 27 * 2
    moe = v2l.layers[1]
    assert moe.moe and not v2l.layers[0].moe and v2l.layers[0].dense.file and not moe.dense.file
    # one expert: gate + up Q4_K (2048 x 1408), down 1408-wide rows -> Q5_0 (kept) or Q8_0 (layer 1: more bits)
    q4k = nbytes(GGMLType.Q4_K, 2048 * 1408)
    assert moe.expert.file == 2 * q4k + nbytes(GGMLType.Q8_0, 2048 * 1408)
    assert moe.expert.gpu == moe.expert.file                      # Q8_0 keeps its size on the GPU
    plain = v2l.layers[4]
    assert plain.expert.file == 2 * q4k + nbytes(GGMLType.Q5_0, 2048 * 1408)
    assert plain.expert.gpu == plain.expert.file                  # Q5_0 too stays in its blocks
    # DESIGN.md: V2-Lite Q4_K_M reads ~0.89 GB of routed experts per token
    assert 0.8e9 < sum(6 * layer.expert.file for layer in v2l.layers) < 0.95e9


def test_gpu_bytes_rule():
    assert gpu_bytes(GGMLType.Q4_K, 256, 144) == 144
    assert gpu_bytes(GGMLType.F32, 10, 40) == 40
    assert gpu_bytes(GGMLType.Q2_K, 256, 84) == 512


def test_linear_layers_count_their_blocks_and_v3_fits_a_12gib_card(monkeypatch):
    """The GPU keeps linear layers of block types in their blocks (kernels/gpu/linear.py), so the whole of
    DeepSeek-V3 (61 layers) in Q4_K_M needs ~10 GiB of GPU memory for 4096 tokens; dequantized to bf16 as
    before, its attention alone took 21 GiB and no 24 GiB card could run it."""
    cfg = synthetic.preset("v3", n_layer=61, n_dense=3)
    v3 = shape_of("v3", n_layer=61, n_dense=3)
    table = {s.name: (s, synthetic.choose_type(s.name, s.shape, "q4_k_m", cfg.n_layer)) for s in tensor_specs(cfg)}
    for i, layer in enumerate(v3.layers):
        want = 0          # attention: projections in blocks, attn_k_b / attn_v_b in bf16, norms in fp32
        for s, t in (v for n, v in table.items() if n.startswith(f"blk.{i}.") and v[0].part in ("attn", "norm")):
            n = int(np.prod(s.shape))
            want += 2 * n if s.name.endswith(("k_b.weight", "v_b.weight")) else nbytes(t, n)
        assert layer.attn.gpu == want
        assert layer.shared.gpu == layer.shared.file and layer.dense.gpu == layer.dense.file
    assert v3.head.gpu == v3.head.file                           # Q6_K output + fp32 norm
    need = minimum(v3, ctx=4096)
    assert 9 * GiB < need < 11 * GiB
    plan(v3, Hardware(), Budget(gpu_bytes=12 * GiB, context=4096))
    monkeypatch.setattr(planner, "BLOCK_TYPES", frozenset())     # every linear layer dequantized to bf16
    assert minimum(shape_of("v3", n_layer=61, n_dense=3), ctx=4096) > 24 * GiB


@pytest.mark.parametrize("name", ["v2l", "v3"])
def test_priorities_in_order(request, name):
    m = request.getfixturevalue(name)
    need = minimum(m)
    base = plan(m, Hardware(), Budget(gpu_bytes=need))
    assert all(on_gpu(base, w) for w in ("attn", "shared", "dense"))
    assert not on_gpu(base, "head") and not on_gpu(base, "embed") and n_gpu_experts(base) == 0
    head = plan(m, Hardware(), Budget(gpu_bytes=need + m.head.gpu))
    assert on_gpu(head, "head") and not on_gpu(head, "embed") and n_gpu_experts(head) == 0
    embed = plan(m, Hardware(), Budget(gpu_bytes=need + m.head.gpu + m.embed.gpu))
    assert on_gpu(embed, "embed") and n_gpu_experts(embed) == 0
    biggest = max(layer.expert.gpu for layer in m.layers)
    more = plan(m, Hardware(), Budget(gpu_bytes=need + m.head.gpu + m.embed.gpu + 10 * biggest))
    assert n_gpu_experts(more) >= 10


@pytest.mark.parametrize("name", ["v2l", "v3"])
def test_monotone_and_within_budget(request, name):
    m = request.getfixturevalue(name)
    need = minimum(m)
    total = need + m.head.gpu + m.embed.gpu + sum(m.n_expert * layer.expert.gpu for layer in m.layers)
    prev = None
    for budget in np.linspace(need, total + GiB, 41).astype(np.int64):
        p = plan(m, Hardware(), Budget(gpu_bytes=int(budget)))
        assert p.gpu_bytes <= budget
        gpu = {(lp.index, e) for lp in p.layers for e in lp.gpu_experts}
        flags = (on_gpu(p, "head"), on_gpu(p, "embed"))
        if prev is not None:
            assert prev[0] <= gpu and all(b or not a for a, b in zip(prev[1], flags))
            assert p.cpu_bytes_per_token <= prev[2]
        prev = (gpu, flags, p.cpu_bytes_per_token)
    assert n_gpu_experts(p) == m.n_expert * sum(layer.moe for layer in m.layers) and p.cpu_bytes_per_token == 0


def skewed(m: ModelShape, seed=0):
    """Per MoE layer, a random 25% of the experts hold 60% of the routing mass."""
    rng = np.random.default_rng(seed)
    E, hot = m.n_expert, m.n_expert // 4
    counts = {}
    for i, layer in enumerate(m.layers):
        if layer.moe:
            c = np.full(E, 40.0 / (E - hot))
            c[rng.permutation(E)[:hot]] = 60.0 / hot
            counts[i] = np.round(c * 1000)
    return counts


def test_hottest_experts_first_and_cpu_bytes_fall_with_the_mass_moved(v2l):
    hotness = skewed(v2l)
    need = minimum(v2l) + v2l.head.gpu + v2l.embed.gpu
    n_hot = sum(v2l.layers[i].expert.gpu * 16 for i in hotness)
    cpu_all = plan(v2l, Hardware(), Budget(gpu_bytes=need, hotness=hotness))
    p = plan(v2l, Hardware(), Budget(gpu_bytes=need + n_hot, hotness=hotness))
    for lp in p.layers:
        if lp.n_expert:
            hot = set(np.argsort(-hotness[lp.index], kind="stable")[:16])
            assert set(lp.gpu_experts) == hot, lp.index    # exactly the hot quarter of every layer
    assert p.ranking.startswith("measured")
    # 60% of the routing mass moved to the GPU: the CPU reads 40% of what it read before
    assert p.cpu_expert_bytes_per_token == pytest.approx(0.4 * cpu_all.cpu_expert_bytes_per_token, rel=1e-3)
    # the same budget without hotness: experts by id, uniform routing -> a quarter of the mass moved
    u = plan(v2l, Hardware(), Budget(gpu_bytes=need + n_hot))
    assert u.ranking.startswith("expert id") and all(lp.gpu_experts == tuple(range(16)) for lp in u.layers
                                                      if lp.n_expert)
    assert u.cpu_expert_bytes_per_token == pytest.approx(0.75 * cpu_all.cpu_expert_bytes_per_token, rel=1e-3)


def test_cpu_only_and_no_gpu(v3):
    for hw, budget in [(Hardware(), Budget(gpu_bytes=100 * GiB, cpu_only=True)),
                       (Hardware(gpu_bytes_free=0), Budget(gpu_bytes=100 * GiB))]:
        p = plan(v3, hw, budget)
        assert p.gpu_bytes == 0 and n_gpu_experts(p) == 0 and "CPU only" in p.note
        parts = [q for lp in p.layers for q in (lp.attn, lp.kv_cache, lp.shared, lp.dense)] + [p.head, p.embed]
        assert all(q.device == "cpu" for q in parts)
        assert p.cpu_other_bytes_per_token > 0 and p.cpu_expert_bytes_per_token > 0


def test_gpu_experts_override(v2l):
    hotness = skewed(v2l, seed=1)
    p = plan(v2l, Hardware(), Budget(gpu_bytes=100 * GiB, gpu_experts=3, hotness=hotness))
    assert on_gpu(p, "head") and on_gpu(p, "embed")
    for lp in p.layers:
        if lp.n_expert:
            assert lp.gpu_experts == tuple(sorted(np.argsort(-hotness[lp.index], kind="stable")[:3]))
    with pytest.raises(PlanError, match="--gpu-experts 3"):   # forced experts count in the minimum
        plan(v2l, Hardware(), Budget(gpu_bytes=minimum(v2l), gpu_experts=3))
    with pytest.raises(PlanError, match="between 0 and the 64"):
        plan(v2l, Hardware(), Budget(gpu_bytes=100 * GiB, gpu_experts=65))


def test_refusal_names_the_bytes_needed(v3):
    need = minimum(v3, ctx=4096)
    assert need > v3.kv_bytes_per_token * 4096
    with pytest.raises(PlanError) as e:
        plan(v3, Hardware(), Budget(gpu_bytes=GiB))
    msg = str(e.value)
    assert msg.startswith("a GPU budget of 1.0 GiB cannot hold") and f"({need} bytes)" in msg
    assert "--gpu-memory" in msg and "--cpu-only" in msg
    assert minimum(v3, ctx=8192) - need == v3.kv_bytes_per_token * 4096
    with pytest.raises(PlanError, match="free on the GPU"):
        plan(v3, Hardware(gpu_bytes_free=8 * GiB), Budget(gpu_bytes=12 * GiB))


def test_format_plan(v2l):
    text = format_plan(plan(v2l, Hardware(), Budget(gpu_bytes=12 * GiB)))
    lines = text.splitlines()
    assert sum(line.startswith("  layer ") for line in lines) == 27
    assert "| dense GPU" in lines[1] and "experts " in lines[2] and "/64 GPU" in lines[2]
    assert "of a 12.0 GiB budget" in text and "CPU reads" in lines[-1] and "per token" in lines[-1]


@pytest.mark.parametrize("text,value", [("12GiB", 12 * GiB), ("12G", 12 * GiB), ("12gb", 12 * 10**9),
                                        ("500MiB", 500 * MiB), ("1.5 GiB", 3 * GiB // 2), ("64B", 64)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "12", "lots", "12 GiBs", "-1G", "1e3G"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(ValueError, match="cannot read"):
        parse_size(text)


def test_info_prints_the_plan(tiny_gguf, capsys):
    path = tiny_gguf("tiny-v2", "q8_0")
    assert cli.main(["info", path, "--gpu-memory", "64MiB", "--ctx", "256"]) == 0
    out = capsys.readouterr().out
    assert "placement" in out and "experts 8/8 GPU" in out and "head GPU" in out
    assert cli.main(["info", path, "--cpu-only", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["plan"]["gpu_bytes"] == 0 and d["plan"]["context"] == 4096
    assert cli.main(["info", path]) == 0
    assert "placement" not in capsys.readouterr().out


@pytest.mark.parametrize("args,words", [(["--gpu-memory", "1MiB"], ("cannot hold", "bytes)", "--cpu-only")),
                                        (["--gpu-memory", "twelve"], ("cannot read 'twelve' as a size",)),
                                        (["--gpu-experts", "2"], ("needs --gpu-memory",))])
def test_info_refusals_are_one_line_exit_2(tiny_gguf, capsys, args, words):
    assert cli.main(["info", tiny_gguf("tiny-v2", "q8_0"), *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dslocal info: ") and captured.out == ""
    for w in words:
        assert w in err[0]


@pytest.mark.parametrize("args,words", [(["--pull-experts", "9"], ("--pull-experts must be 0 to",)),
                                        (["--pull-experts", "1", "--device", "cpu"], ("needs a GPU",))])
def test_run_refuses_pull_experts_it_cannot_use(tiny_gguf, capsys, args, words):
    rc = cli.main(["run", "--gguf", tiny_gguf("tiny-v2", "q8_0"), "--prompt", "x", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("dslocal run: "), err
    for w in words:
        assert w in err[0]
