"""`dslocal bench` (bench/e2e.py, bench/chart.py): the chart, the table and JSON, the context check, and a real
run on the bundled model. Nothing here asserts a speed: the numbers only have to exist and be positive."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from dslocal.bench import chart, e2e
from dslocal.gui import cli


def results(placement: bool = True, lengths=((128, 1234.5, 35.1), (2048, 987.6, 30.2))) -> dict:
    """A results dict as bench/e2e.py builds it, with round numbers; lengths are (prompt, prefill, decode)."""
    plan = {"gpu_bytes": 3 * 2**30, "cpu_bytes": 8 * 2**30, "budget_bytes": 12 * 2**30,
            "cpu_expert_bytes_per_token": 0.89e9, "note": ""} if placement else None
    rows = [{"prompt_tokens": n, "ttft_s": n / p, "prefill_s": n / p, "prefill_tokens_per_s": p, "decode_tokens": 128,
             "decode_tokens_per_s": d, "runs": []} for n, p, d in lengths]
    settings = {"device": "cuda", "dtype": "bfloat16", "where": e2e.where("12GiB", plan), "threads": 16,
                "gpu_memory": "12GiB", "cpu_only": False, "gpu_experts": None, "reference": not placement,
                "gen": 128, "repeat": 3, "prompt_lengths": [n for n, _, _ in lengths]}
    r = {"model": {"file": "/models/v2-lite.gguf", "name": "DeepSeek-V2-Lite", "layers": 27, "experts": 64,
                   "experts_used": 6, "context": 2176},
         "load_s": 12.5, "warmup_s": 1.5, "placement": plan, "peak_rss_GiB": 9.25, "peak_gpu_GiB": 3.5,
         "gpu": "H200", "lengths": rows, "settings": settings,
         "dram": {"bytes": 4 * 2**30, "threads": 16, "seconds": 0.05, "GB_per_s": 85.9, "median_GB_per_s": 85.0}}
    e2e.add_bandwidth(r)
    return r


def bar_heights(img: Image.Image, color: tuple[int, int, int]) -> list[int]:
    """Heights in pixels of the bars of one color, left to right (runs of columns holding that color)."""
    mask = (np.asarray(img) == np.array(color, np.uint8)).all(axis=2)
    cols = mask.sum(axis=0)
    heights, current = [], 0
    for c in cols:
        if c:
            current = max(current, int(c))
        elif current:
            heights.append(current)
            current = 0
    return heights + ([current] if current else [])


@pytest.mark.parametrize("case", ["two lengths", "one length, reference path", "zero decode"])
def test_chart_is_a_png_with_bars_in_proportion(tmp_path, case):
    r = {"two lengths": lambda: results(),
         "one length, reference path": lambda: results(placement=False, lengths=((8, 50.0, 5.0),)),
         "zero decode": lambda: results(lengths=((16, 300.0, 0.0), (64, 120.0, 12.0), (256, 10.0, 3.0)))}[case]()
    path = tmp_path / "bench.png"
    chart.write_chart(r, str(path))
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (chart.WIDTH, chart.HEIGHT)
        img = img.convert("RGB")
    for key, color in (("prefill_tokens_per_s", chart.PREFILL_COLOR), ("decode_tokens_per_s", chart.DECODE_COLOR)):
        values = [row[key] for row in r["lengths"]]
        heights = bar_heights(img, color)
        drawn = [v for v in values if v > 0]
        assert len(heights) == len(drawn), (key, heights, values)
        # the tallest bar sets the scale; every other bar must be in proportion to within a pixel or two
        scale = heights[int(np.argmax(drawn))] / max(drawn)
        err = max(abs(h - v * scale) for h, v in zip(heights, drawn))
        print(f"{case}, {key}: bar heights {heights} px, largest error {err:.2f} px")
        assert err <= 2.0
        assert max(heights) > 0.3 * chart.HEIGHT   # the scale is not wasted (the top tick is < 1.5x the top bar)


def test_ticks_are_round_and_cover_the_top():
    for top, want in ((1234.5, [0, 500, 1000, 1500]), (35.1, [0, 10, 20, 30, 40]), (0.0, [0, 0.2, 0.4, 0.6, 0.8, 1.0])):
        got = chart.nice_ticks(top)
        print(top, got)
        assert np.allclose(got, want)
    tops = np.random.default_rng(0).lognormal(0, 4, 2000)
    ratios = []
    for top in tops:
        t = chart.nice_ticks(top)
        steps = np.diff(t)
        assert np.allclose(steps, steps[0]) and t[0] == 0 and 2 <= len(t) <= 7
        ratios.append(t[-1] / top)
    print(f"top tick / largest value: {min(ratios):.3f} .. {max(ratios):.3f}")
    assert 1 <= min(ratios) and max(ratios) < 1.5


def test_bandwidth_columns():
    r = results()
    for row in r["lengths"]:
        want = row["decode_tokens_per_s"] * 0.89e9 / 1e9
        print(f"{row['prompt_tokens']}: {row['decode_GB_per_s']:.3f} GB/s, want {want:.3f}")
        assert row["decode_GB_per_s"] == pytest.approx(want, rel=1e-12)
        assert row["decode_frac_dram"] == pytest.approx(want / 85.9, rel=1e-12)
    ref = results(placement=False)
    assert all(row["decode_GB_per_s"] is None and row["decode_frac_dram"] is None for row in ref["lengths"])


def test_table_and_json():
    r = results()
    table = e2e.format_table(r)
    print(table)
    lines = table.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["prompt", "TTFT"])
    rows = [ln.split() for ln in lines[header + 1:]]
    assert rows[0] == ["128", "0.104", "1234.5", "128", "35.1", "31.24", "36.4%"]
    assert rows[1] == ["2048", "2.074", "987.6", "128", "30.2", "26.88", "31.3%"]
    assert "85.9 GB/s" in table and "peak RSS 9.25 GiB" in table and "peak GPU 3.50 GiB" in table
    assert "GPU budget 12.0 GiB" in table
    assert json.loads(json.dumps(r)) == r   # plain JSON types only

    ref = e2e.format_table(results(placement=False)).splitlines()
    assert ref[-1].split()[-2:] == ["-", "-"] and "reference path" in "\n".join(ref)


def test_prompt_lengths():
    log = io.StringIO()
    assert e2e.prompt_lengths(None, 128, 512, log) == [128]
    assert "2048-token prompt" in log.getvalue()
    assert e2e.prompt_lengths(None, 128, 163840, log) == [128, 2048]
    assert e2e.prompt_lengths(None, 128, 200, log) == [72]
    assert e2e.prompt_lengths("8, 16", 4, 512) == [8, 16]
    with pytest.raises(ValueError, match="needs 604 tokens of context but the model holds 512"):
        e2e.prompt_lengths("600", 4, 512)
    with pytest.raises(ValueError, match="whole numbers"):
        e2e.prompt_lengths("8,x", 4, 512)


def test_prompt_longer_than_the_context_is_a_usage_error(capsys):
    rc = cli.main(["bench", "--prompt-lengths", "8,600", "--gen", "4"])   # the bundled model holds 512
    err = capsys.readouterr().err.strip()
    print(err)
    assert rc == 2 and len(err.splitlines()) == 1 and "600-token prompt" in err and "Traceback" not in err


@pytest.mark.parametrize("path", ["placed", "reference"])
def test_real_run_on_the_bundled_model(tmp_path, capsys, path):
    out = tmp_path / "bench.json"
    argv = ["bench", "--device", "cpu", "--prompt-lengths", "8,16", "--gen", "4", "--repeat", "1",
            "--dram-gib", "0.25", "--json", str(out)] + (["--reference"] if path == "reference" else [])
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    print(e2e.format_table(r))
    assert "decode tok/s" in printed and str(out) in printed
    for key in ("load_s", "peak_rss_GiB"):
        assert r[key] > 0, key
    assert r["dram"]["GB_per_s"] > 0
    assert [row["prompt_tokens"] for row in r["lengths"]] == [8, 16]
    for row in r["lengths"]:
        for key in ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s"):
            assert row[key] > 0, (row["prompt_tokens"], key)
        assert row["decode_tokens"] == 4          # end-of-text does not cut a run short
        assert row["runs"][0]["prefilled_tokens"] == row["prompt_tokens"]   # nothing from the prefix cache
        assert set(row["runs"][0]["decode_prefilled_tokens"]) == {1}         # decode re-prefills nothing
        if path == "placed":
            assert r["placement"]["cpu_expert_bytes_per_token"] > 0
            assert row["decode_GB_per_s"] > 0 and row["decode_frac_dram"] > 0
        else:
            assert r["placement"] is None and row["decode_GB_per_s"] is None
    with Image.open(tmp_path / "bench.png") as img:
        assert img.format == "PNG"
