"""Charts: size, mode, real content, one colour per drawn metric, and the ComfyUI IMAGE tensor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageColor

from moe_sampler.stats.charts import PALETTE, expert_stats_chart, image_to_comfy_tensor, line_chart
from moe_sampler.stats.store import ExpertStats


def stats_entry(name: str, value: float | None, **overrides) -> ExpertStats:
    values = dict(
        expert=name, runs=10, quality_score=value, speed_score=value, efficiency_score=value,
        success_rate=value, mean_confidence=value, mean_nfe=12.0, mean_seconds=1.0,
    )  # fmt: skip
    values.update(overrides)
    return ExpertStats(**values)


def colour_pixels(image: Image.Image, colour: str, tolerance: int = 4) -> int:
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    target = np.array(ImageColor.getrgb(colour), dtype=np.int16)
    return int((np.abs(pixels - target).max(axis=-1) <= tolerance).sum())


def line_pixels(series: dict, colour: str, **options) -> int:
    """Pixels near ``colour`` that the series' line adds beyond its legend swatch."""
    drawn = line_chart(series, **options)
    hidden = {name: (x, [math.nan] * len(x)) for name, (x, _) in series.items()}
    blank = line_chart({**hidden, "_": ([0], [0.0])}, **options)
    return colour_pixels(drawn, colour, tolerance=40) - colour_pixels(blank, colour, tolerance=40)


def test_expert_stats_chart_draws_a_bar_per_metric():
    image = expert_stats_chart([stats_entry("SpeedDemon", 0.9), stats_entry("QualityMaster", 0.4)], title="Pool")
    assert image.mode == "RGB" and image.width == 960 and image.height > 200
    assert np.asarray(image).std() > 20
    counts = [colour_pixels(image, colour) for colour in PALETTE[:5]]
    assert all(count > 500 for count in counts), counts


def test_missing_scores_draw_no_bar_and_more_experts_make_a_taller_chart():
    empty = expert_stats_chart([stats_entry("Broken", None, success_rate=0.0, mean_nfe=None, mean_seconds=None)])
    assert colour_pixels(empty, PALETTE[0]) < 300  # only the legend swatch, no quality bar
    one = expert_stats_chart([stats_entry("A", 0.5)], width=480)
    three = expert_stats_chart([stats_entry(name, 0.5) for name in "ABC"], width=480)
    assert one.width == three.width == 480 and three.height > one.height


def test_long_names_and_empty_stats_still_render():
    long_name = expert_stats_chart([stats_entry("x" * 300, 1.0)])
    assert long_name.width == 960 and np.asarray(long_name).std() > 20
    nothing = expert_stats_chart([])
    assert nothing.mode == "RGB" and np.asarray(nothing).std() > 1


def test_line_chart_has_axes_lines_and_legend():
    xs = list(range(50))
    series = {"reward": (xs, [1 - math.exp(-x / 10) for x in xs]), "baseline": ([0, 49], [0.5, 0.5])}
    options = dict(title="Learning curve", xlabel="episode", ylabel="reward", width=800, height=450)
    image = line_chart(series, **options)
    assert image.size == (800, 450) and image.mode == "RGB"
    assert np.asarray(image).std() > 10
    assert line_pixels(series, PALETTE[0], **options) > 500
    assert line_pixels(series, PALETTE[1], **options) > 500


def test_line_chart_survives_awkward_data():
    gappy = line_chart({"a": ([0, 1, 2, 3], [1.0, math.nan, math.inf, 2.0]), "one": ([5], [5.0])}, title="gaps")
    assert gappy.size == (960, 540) and np.asarray(gappy).std() > 5
    assert line_pixels({"flat": ([1, 2, 3], [7.0, 7.0, 7.0])}, PALETTE[0], log_x=True) > 300
    nothing = line_chart({"none": ([], [])}, title="empty")
    assert nothing.size == (960, 540)
    with pytest.raises(ValueError, match="'bad'"):
        line_chart({"bad": ([1, 2], [1.0])})


def test_image_to_comfy_tensor_layout_and_range():
    image = Image.new("RGB", (7, 5), (255, 0, 128))
    image.putpixel((3, 2), (0, 255, 0))
    tensor = image_to_comfy_tensor(image)
    assert tensor.shape == (1, 5, 7, 3) and tensor.dtype == torch.float32
    assert float(tensor.min()) >= 0.0 and float(tensor.max()) <= 1.0
    assert torch.allclose(tensor[0, 0, 0], torch.tensor([1.0, 0.0, 128 / 255]))
    assert torch.equal(tensor[0, 2, 3], torch.tensor([0.0, 1.0, 0.0]))
    chart = image_to_comfy_tensor(expert_stats_chart([stats_entry("A", 0.5)]).convert("RGBA"))
    assert chart.shape[-1] == 3 and chart.shape[2] == 960
