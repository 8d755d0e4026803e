"""The `dslocal bench` chart: prefill and decode tokens/s per prompt length as labelled bars, drawn with Pillow.

Prefill is often a hundred times faster than decode, so each has its own panel and its own scale; the decode
panel also labels each length with the achieved GB/s of experts read from host memory and its share of the
measured DRAM bandwidth.
"""
from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 1100, 640
PREFILL_COLOR, DECODE_COLOR = (59, 111, 182), (224, 123, 57)
INK, GRID, MUTED = (34, 34, 34), (221, 221, 221), (110, 110, 110)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def nice_ticks(top: float, n: int = 5) -> list[float]:
    """Round tick values 0, step, 2 step, ... covering top, with step 1, 2 or 5 times a power of ten."""
    top = top if top > 0 else 1.0
    raw = top / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(math.ceil(top / step - 1e-9)) + 1)]


def _fmt(v: float) -> str:
    """A bar's value: three significant figures or so, thousands separated."""
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _tick(t: float, step: float) -> str:
    """A tick value with the decimals its step (1, 2 or 5 times a power of ten) needs: 0.2 one, 500 none."""
    return f"{t:,.{max(0, -math.floor(math.log10(step)))}f}"


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], s: str, font, fill=INK, anchor: str = "mm") -> None:
    draw.text(xy, s, font=font, fill=fill, anchor=anchor)


def _panel(draw, box: tuple[int, int, int, int], title: str, values: list[float], labels: list[list[str]],
           color: tuple[int, int, int], label_lines: int, caption: str) -> None:
    """One bar panel in box (left, top, right, bottom): y grid with tick labels, a bar and value per length;
    label_lines lines of text under each bar (the same in both panels, so their axes line up), then a caption."""
    left, top, right, bottom = box
    _text(draw, ((left + right) / 2, top), title, _font(19), anchor="mt")
    plot_top, plot_bottom, plot_left = top + 48, bottom - 34 - 20 * label_lines, left + 70
    ticks = nice_ticks(max(values, default=0.0))
    scale = (plot_bottom - plot_top) / ticks[-1]
    small = _font(14)
    for t in ticks:
        y = plot_bottom - t * scale
        draw.line([(plot_left, y), (right, y)], fill=GRID, width=1)
        _text(draw, (plot_left - 8, y), _tick(t, ticks[1]), small, fill=MUTED, anchor="rm")
    draw.line([(plot_left, plot_top), (plot_left, plot_bottom), (right, plot_bottom)], fill=INK, width=2)
    slot = (right - plot_left) / max(len(values), 1)
    for i, (v, lab) in enumerate(zip(values, labels)):
        cx = plot_left + slot * (i + 0.5)
        half = min(slot * 0.3, 60)
        if v > 0:   # a zero would still draw a one-pixel line
            draw.rectangle([cx - half, plot_bottom - v * scale, cx + half, plot_bottom], fill=color)
        _text(draw, (cx, plot_bottom - v * scale - 6), _fmt(v), _font(16), anchor="mb")
        for j, line in enumerate(lab):
            _text(draw, (cx, plot_bottom + 8 + 20 * j), line, small, fill=INK if j == 0 else MUTED, anchor="mt")
    _text(draw, ((plot_left + right) / 2, bottom), caption, small, fill=MUTED, anchor="mb")


def draw_chart(results: dict) -> Image.Image:
    """The chart of a `dslocal bench` results dict (bench/e2e.py) as an RGB image of WIDTH x HEIGHT."""
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    s, rows = results["settings"], results["lengths"]
    _text(draw, (WIDTH / 2, 18), f"dslocal bench: {results['model']['name']}", _font(24), anchor="mt")
    runs = f"median of {s['repeat']} run" + ("s" if s["repeat"] > 1 else "")
    _text(draw, (WIDTH / 2, 52), f"{s['device']} {s['dtype']}, {s['where']}, {s['threads']} threads, {runs}, "
                                 f"{s['gen']} greedy tokens", _font(15), fill=MUTED, anchor="mt")

    lengths = [f"{r['prompt_tokens']:,}" for r in rows]
    decode_labels = []
    for r, name in zip(rows, lengths):
        gbs, frac = r.get("decode_GB_per_s"), r.get("decode_frac_dram")
        # short lines, so that six or more lengths still fit side by side
        decode_labels.append([name] if gbs is None else [name, f"{_fmt(gbs)} GB/s", f"{100 * frac:.0f}%"])
    top, bottom, lines = 90, HEIGHT - 50, max(len(x) for x in decode_labels)
    _panel(draw, (20, top, WIDTH // 2 - 20, bottom), "prefill tokens/s", [r["prefill_tokens_per_s"] for r in rows],
           [[x] for x in lengths], PREFILL_COLOR, lines, "prompt length (tokens)")
    _panel(draw, (WIDTH // 2 + 10, top, WIDTH - 30, bottom), "decode tokens/s",
           [r["decode_tokens_per_s"] for r in rows], decode_labels, DECODE_COLOR, lines,
           "prompt length (tokens)" + ("" if lines == 1 else "; below: host-memory GB/s, % of DRAM read"))

    memory = f"peak RSS {results['peak_rss_GiB']:.2f} GiB"
    if results.get("peak_gpu_GiB") is not None:
        memory += f", peak GPU {results['peak_gpu_GiB']:.2f} GiB"
    _text(draw, (WIDTH / 2, HEIGHT - 18), f"load {results['load_s']:.1f} s   |   DRAM read "
          f"{results['dram']['GB_per_s']:.1f} GB/s (measured in the same run)   |   {memory}", _font(15),
          fill=MUTED, anchor="mb")
    return img


def write_chart(results: dict, path: str) -> None:
    """Draw the chart of results and save it as a PNG at path."""
    draw_chart(results).save(path, format="PNG")
