"""bench/moe_layer.py at a tiny shape: each form of call it times computes the layer, and the table and JSON
come out. Nothing here asserts a speed."""
import json

import numba
import numpy as np
import torch

from dslocal.bench import moe_layer
from dslocal.kernels.cpu.moe import moe_ffn
from dslocal.offload.cpu_worker import ExpertWorker
from dslocal.quant.ggml import GGMLType

TINY = dict(D=256, F=128, E=8, K=2)


def test_each_form_of_call_computes_the_layer():
    rng = np.random.default_rng(1)
    layers = [moe_layer.layer(TINY, GGMLType.Q8_0, rng) for _ in range(2)]
    x = rng.standard_normal((1, TINY["D"]), dtype=np.float32)
    w = np.array([[0.25, 0.75]], np.float32)
    with ExpertWorker(2, pin_memory=False) as worker:
        for kind in (moe_layer.FlaggedCalls, moe_layer.FixedCalls):
            run = kind(worker, layers, np.zeros_like(x), TINY["K"])
            for ids in ([[3, 5]], [[0, 7]], [[6, -1]]):
                ids = np.array(ids)
                assert run(x, ids, w) > 0
                call = run.calls[run.n % len(layers)]
                np.testing.assert_array_equal(call.out, moe_ffn(x, ids, w, call.experts))
        flagged = moe_layer.FlaggedCalls(worker, layers, x, TINY["K"])
        flagged(x, np.array([[1, 2]]), w)
        flagged(x, np.array([[2, 3]]), w)
        assert list(flagged.sync) == [2, 2, 0]     # ready and done reached the second step


def test_table_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(moe_layer, "SHAPES", {"tiny": TINY})
    monkeypatch.setattr(moe_layer, "CACHE_DEFEAT_BYTES", 1)
    torch_threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    out = tmp_path / "layer.json"
    try:
        assert moe_layer.main(["--shapes", "tiny", "--types", "q8_0", "--tokens", "1,512", "--threads", "1",
                               "--dram-gib", "0.03", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(torch_threads)
        numba.set_num_threads(numba_threads)
    r = json.loads(out.read_text())
    rows = {(row["impl"], row["T"]): row for row in r["rows"]}
    assert set(rows) == {("dslocal", 1), ("dslocal", 512), ("torch", 1), ("torch", 512)}
    one, many = rows["dslocal", 1], rows["dslocal", 512]
    assert one["ms"] > 0 and one["call_ms"] > 0 and one["moe_ffn_ms"] > 0 and one["types"] == "Q8_0"
    assert one["GB_read"] == TINY["K"] * 3 * TINY["D"] * TINY["F"] * 34 / 32 / 1e9
    assert all(np.isclose(row["frac_dram"], row["GB_per_s"] / row["dram_GB_per_s"]) for row in r["rows"])
    assert all(row["dram_GB_per_s"] > 0 for row in r["rows"])
    assert many["t8x64_ms"] > 0 and np.isclose(many["speedup_vs_t8x64"], many["t8x64_ms"] / many["ms"])
    assert r["dram_after"]["GB_per_s"] > 0
    printed = capsys.readouterr().out
    assert "call ms" in printed and "DRAM read bandwidth at the end" in printed
