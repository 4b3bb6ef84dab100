"""Charts for the MoE Stats node and for learning curves: Pillow and numpy only, no matplotlib.

Everything is drawn at ``SCALE`` times the requested size and scaled down with a Lanczos
filter, which anti-aliases lines and text. Colours are the Okabe-Ito palette, which stays
distinguishable under the common forms of colour blindness.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .records import ExpertStats

SCALE = 2
METRICS = (
    ("quality_score", "Quality"),
    ("speed_score", "Speed"),
    ("efficiency_score", "Efficiency"),
    ("success_rate", "Success rate"),
    ("mean_confidence", "Confidence"),
)
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000", "#F0E442")
INK, MUTED, GRID, BAND = "#222222", "#6b6b6b", "#dedede", "#f4f5f7"
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@functools.lru_cache(maxsize=16)
def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _width(text: str, font: Font) -> int:
    return math.ceil(font.getlength(text))


def _fit(text: str, font: Font, max_width: int) -> str:
    """``text``, cut with an ellipsis so that it is at most ``max_width`` wide."""
    if _width(text, font) <= max_width:
        return text
    text = text[: max(max_width // 4, 1)]  # no glyph is narrower than 4 px at these sizes; bounds the loop
    while text and _width(text + "…", font) > max_width:
        text = text[:-1]
    return text + "…"


def _wrap(text: str, font: Font, max_width: int) -> list[str]:
    """``text`` broken at spaces into lines at most ``max_width`` wide (a longer word is cut)."""
    lines: list[str] = []
    for word in text.split():
        if lines and _width(f"{lines[-1]} {word}", font) <= max_width:
            lines[-1] += f" {word}"
        else:
            lines.append(_fit(word, font, max_width))
    return lines


def _legend(draw: ImageDraw.ImageDraw | None, items: Sequence[tuple[str, str]], left: int, right: int, top: int) -> int:
    """Lay out (label, colour) swatches in wrapped rows from ``top``; draw them if ``draw``; return the bottom."""
    font, swatch, line = _font(13 * SCALE), 12 * SCALE, 20 * SCALE
    x, y = left, top
    for label, colour in items:
        label = _fit(label, font, right - left - swatch - 6 * SCALE)
        item = swatch + 6 * SCALE + _width(label, font)
        if x > left and x + item > right:
            x, y = left, y + line
        if draw is not None:
            middle = y + line // 2
            draw.rectangle((x, middle - swatch // 2, x + swatch, middle + swatch // 2), fill=colour)
            draw.text((x + swatch + 6 * SCALE, middle), label, font=font, fill=INK, anchor="lm")
        x += item + 18 * SCALE
    return y + line if items else top


def _finish(image: Image.Image) -> Image.Image:
    return image.resize((image.width // SCALE, image.height // SCALE), Image.Resampling.LANCZOS)


def _message(title: str, text: str, width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width * SCALE, height * SCALE), "white")
    draw = ImageDraw.Draw(image)
    title_font = _font(22 * SCALE)
    draw.text((20 * SCALE, 20 * SCALE), _fit(title, title_font, (width - 40) * SCALE), font=title_font, fill=INK)
    draw.text((image.width // 2, image.height // 2), text, font=_font(16 * SCALE), fill=MUTED, anchor="mm")
    return _finish(image)


def expert_stats_chart(stats: Sequence[ExpertStats], title: str = "MoE experts", width: int = 960) -> Image.Image:
    """Grouped horizontal bars, one group per expert: quality, speed, efficiency, success, confidence.

    Every score is in [0, 1] on one shared axis; each bar carries its value and "n/a" marks a
    score with nothing to average. The label column shows runs, mean NFE and mean seconds.
    Returns an RGB image ``width`` wide, its height growing with the number of experts.
    """
    if not stats:
        return _message(title, "No runs recorded yet", width, 240)
    s = SCALE
    title_font, name_font, small_font = _font(22 * s), _font(15 * s), _font(12 * s)
    pad, bar, bar_gap, group_gap = 20 * s, 13 * s, 3 * s, 22 * s
    canvas_width = width * s
    details = [_details(entry) for entry in stats]
    label_width = max(_width(entry.expert, name_font) for entry in stats)
    label_width = min(max(label_width, *(_width(d, small_font) for d in details)), int(canvas_width * 0.32))
    plot_left = pad + label_width + 16 * s
    plot_right = canvas_width - pad - _width("0.00", small_font) - 10 * s
    legend = [(name, PALETTE[j]) for j, (_, name) in enumerate(METRICS)]
    top = _legend(None, legend, plot_left, canvas_width - pad, pad + 34 * s) + 16 * s
    group = len(METRICS) * bar + (len(METRICS) - 1) * bar_gap
    bottom = top + len(stats) * (group + group_gap)
    note = "Scores in [0, 1], higher is better. Speed and efficiency are relative to the experts shown."
    note_lines = _wrap(note, small_font, canvas_width - 2 * pad)
    image = Image.new("RGB", (canvas_width, bottom + (30 + 16 * len(note_lines)) * s + pad), "white")
    draw = ImageDraw.Draw(image)
    draw.text((pad, pad), _fit(title, title_font, canvas_width - 2 * pad), font=title_font, fill=INK)
    _legend(draw, legend, plot_left, canvas_width - pad, pad + 34 * s)
    span = plot_right - plot_left
    for i in range(len(stats)):
        if i % 2 == 0:
            y0 = top + i * (group + group_gap)
            draw.rectangle((pad // 2, y0, canvas_width - pad // 2, y0 + group + group_gap), fill=BAND)
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = plot_left + round(tick * span)
        draw.line((x, top, x, bottom), fill=INK if tick == 0 else GRID, width=s)
        draw.text((x, bottom + 6 * s), f"{tick:g}", font=small_font, fill=MUTED, anchor="ma")
    for k, line in enumerate(note_lines):
        draw.text((pad, bottom + (32 + 16 * k) * s), line, font=small_font, fill=MUTED)
    for i, (entry, detail) in enumerate(zip(stats, details)):
        y0 = top + i * (group + group_gap) + group_gap // 2
        middle = y0 + group // 2
        name, detail = _fit(entry.expert, name_font, label_width), _fit(detail, small_font, label_width)
        draw.text((pad, middle - 10 * s), name, font=name_font, fill=INK, anchor="lm")
        draw.text((pad, middle + 11 * s), detail, font=small_font, fill=MUTED, anchor="lm")
        for j, (field, _) in enumerate(METRICS):
            value = getattr(entry, field)
            y = y0 + j * (bar + bar_gap)
            if value is None:
                draw.text((plot_left + 6 * s, y + bar // 2), "n/a", font=small_font, fill=MUTED, anchor="lm")
                continue
            end = plot_left + max(round(min(max(value, 0.0), 1.0) * span), s)
            draw.rectangle((plot_left, y, end, y + bar - 1), fill=PALETTE[j])
            draw.text((end + 5 * s, y + bar // 2), f"{value:.2f}", font=small_font, fill=INK, anchor="lm")
    return _finish(image)


def _details(entry: ExpertStats) -> str:
    text = f"{entry.runs} run{'s' if entry.runs != 1 else ''}"
    if entry.mean_nfe is not None and entry.mean_seconds is not None:
        text += f" · {entry.mean_nfe:.3g} NFE · {entry.mean_seconds:.3g} s"
    return text


def _nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """About ``count`` round ticks (1, 2, 2.5 or 5 times a power of ten) covering [low, high]."""
    if high <= low:
        half = max(abs(low) * 0.05, 0.5)
        low, high = low - half, high + half
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [k * step for k in range(first, last + 1)]


def _tick_label(value: float, step: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or step < 1e-3:
        return f"{value:.3g}"
    return f"{value:.{max(0, -math.floor(math.log10(step) + 1e-9))}f}" if step < 1 else f"{value:g}"


def line_chart(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    width: int = 960,
    height: int = 540,
    log_x: bool = False,
    integer_x: bool = False,
) -> Image.Image:
    """Lines with axes, round ticks, grid and legend, e.g. learning curves; ``series`` maps a name to (x, y).

    Non-finite points break a line instead of stretching the axes; a short series also gets a
    marker per point. ``log_x`` puts x on a log10 axis (for sweeps such as lambda; x <= 0 is
    dropped); ``integer_x`` keeps x ticks on whole numbers (counts such as episodes). Returns an RGB
    image of ``width`` x ``height``.
    """
    points = {}
    for name, pair in series.items():
        if len(pair) != 2 or len(pair[0]) != len(pair[1]):
            raise ValueError(f"series {name!r} must be (x values, y values) of equal length")
        x = np.asarray(pair[0], dtype=np.float64)
        if log_x:
            x = np.log10(np.where(x > 0, x, np.nan))
        points[name] = (x, np.asarray(pair[1], dtype=np.float64))
    finite = [(x[m], y[m]) for x, y in points.values() for m in [np.isfinite(x) & np.isfinite(y)] if m.any()]
    if not finite:
        return _message(title, "No data yet", width, height)
    xs, ys = np.concatenate([f[0] for f in finite]), np.concatenate([f[1] for f in finite])
    x_ticks, y_ticks = _nice_ticks(xs.min(), xs.max(), 8), _nice_ticks(ys.min(), ys.max(), 6)
    if log_x:  # one tick per decade
        first = math.floor(xs.min())
        x_ticks = [float(k) for k in range(first, max(math.ceil(xs.max()), first + 1) + 1)]
    elif integer_x and x_ticks[1] - x_ticks[0] < 1:  # counts (episodes): no fractional ticks
        first = math.floor(xs.min())
        x_ticks = [float(k) for k in range(first, max(math.ceil(xs.max()), first + 1) + 1)]

    def x_label(value: float) -> str:
        return f"{10 ** value:g}" if log_x else _tick_label(value, x_ticks[1] - x_ticks[0])

    s = SCALE
    pad, font, label_font = 20 * s, _font(12 * s), _font(14 * s)
    canvas = Image.new("RGB", (width * s, height * s), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), _fit(title, _font(22 * s), canvas.width - 2 * pad), font=_font(22 * s), fill=INK)
    legend = [(name, PALETTE[k % len(PALETTE)]) for k, name in enumerate(points)]
    y_labels = [_tick_label(v, y_ticks[1] - y_ticks[0]) for v in y_ticks]
    left = pad + (24 * s if ylabel else 0) + max(_width(t, font) for t in y_labels) + 10 * s
    right = canvas.width - pad - _width(x_label(x_ticks[-1]), font) // 2
    top = _legend(draw, legend, left, right, pad + 34 * s) + 12 * s
    bottom = canvas.height - pad - (26 * s if xlabel else 0) - 22 * s

    def to_x(value: np.ndarray | float) -> np.ndarray:
        return left + (np.asarray(value) - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * (right - left)

    def to_y(value: np.ndarray | float) -> np.ndarray:
        return bottom - (np.asarray(value) - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * (bottom - top)

    for value, text in zip(y_ticks, y_labels):
        y = float(to_y(value))
        draw.line((left, y, right, y), fill=GRID, width=s)
        draw.text((left - 8 * s, y), text, font=font, fill=MUTED, anchor="rm")
    minor = [k + math.log10(m) for k in x_ticks[:-1] for m in range(2, 10)] if log_x else []
    for value in minor:
        draw.line((float(to_x(value)), top, float(to_x(value)), bottom), fill=BAND, width=s)
    for value in x_ticks:
        x = float(to_x(value))
        draw.line((x, top, x, bottom), fill=GRID, width=s)
        draw.text((x, bottom + 6 * s), x_label(value), font=font, fill=MUTED, anchor="ma")
    draw.line((left, top, left, bottom, right, bottom), fill=INK, width=s)
    for (name, colour), (x, y) in zip(legend, points.values()):
        px, py, ok = to_x(x), to_y(y), np.isfinite(x) & np.isfinite(y)
        breaks = np.flatnonzero(~ok)
        for run in np.split(np.arange(len(x)), breaks):
            run = run[ok[run]]
            if len(run) > 1:
                draw.line(list(zip(px[run].tolist(), py[run].tolist())), fill=colour, width=5 * s // 2, joint="curve")
        if ok.sum() <= 40:
            for cx, cy in zip(px[ok].tolist(), py[ok].tolist()):
                draw.ellipse((cx - 3.5 * s, cy - 3.5 * s, cx + 3.5 * s, cy + 3.5 * s), fill=colour)
    if xlabel:
        draw.text(((left + right) // 2, canvas.height - pad), xlabel, font=label_font, fill=INK, anchor="md")
    if ylabel:
        ylabel = _fit(ylabel, label_font, bottom - top)
        text = Image.new("RGB", (_width(ylabel, label_font) + 4 * s, 20 * s), "white")
        ImageDraw.Draw(text).text((2 * s, 10 * s), ylabel, font=label_font, fill=INK, anchor="lm")
        text = text.rotate(90, expand=True)
        canvas.paste(text, (pad, max(top, (top + bottom - text.height) // 2)))
    return _finish(canvas)


def image_to_comfy_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as ComfyUI's IMAGE: float32 [1, H, W, 3] in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).unsqueeze(0).contiguous()
