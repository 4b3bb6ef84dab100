"""Why this expert: what the router expected from every expert of the pool, in user words.

:func:`explain` turns a routing decision (:class:`~moe_sampler.router.policy.Selection`) and
the pool into plain data: per expert the expected quality (0-1, the pack's quality score),
the expected model calls (from the router's predicted cost, ``cost = log2(calls) / 10``), an
estimated time (this run's seconds per model call times the expected calls), the score the
router ranked by (``expected quality - price of model calls at this priority``) and the pick's
lead over the runner-up. :func:`settings` describes an expert completely enough to reproduce a
run (for a ComfyUI sampler: the KSampler settings). :func:`why_chart` draws the comparison as a
small PNG-ready PIL image (bars of expected quality, calls and time as text), which ComfyUI
shows as the node's image preview in both frontends.

No ComfyUI import: tests and the CLI use this module directly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

# Score gaps (utility units: one unit is the whole 0-1 quality range) and their words.
NEAR_TIE, CLOSE = 0.02, 0.08


def priority_words(priority: float) -> str:
    if priority <= 0.2:
        return "speed first"
    if priority < 0.4:
        return "leaning to speed"
    if priority <= 0.6:
        return "balanced"
    if priority < 0.8:
        return "leaning to quality"
    return "quality first"


def expected_calls(cost: float) -> int:
    """Model calls behind a predicted cost (``cost = log2(calls) / 10``)."""
    return max(1, int(round(2.0 ** (10.0 * max(float(cost), 0.0)))))


def lead_words(gap: float | None) -> str:
    if gap is None:
        return "the only expert in the pool"
    if gap < NEAR_TIE:
        return "a near tie"
    if gap < CLOSE:
        return "a close call"
    return "a clear lead"


def router_info(router: Any, label: str) -> dict:
    """Name and version of a router: file label, its own name, creation time, training so far."""
    from ..router.features import FEATURE_VERSION

    training = dict(getattr(router, "training", {}) or {})
    contexts, runs = int(training.get("contexts", 0) or 0), int(training.get("runs", 0) or 0)
    if label == "default":
        learning = "untrained: ranks experts by their descriptions only"
    elif contexts == 0 and runs == 0:
        learning = "no training recorded"
    else:
        learning = f"trained on {contexts} contexts ({runs} expert runs); retrain or resume to keep learning"
    return {"label": label, "name": getattr(router, "name", label), "created": getattr(router, "created", None),
            "feature_version": FEATURE_VERSION, "training": {"contexts": contexts, "runs": runs},
            "learning": learning}


def settings(expert: Any) -> dict:
    """Everything that fixes what ``expert`` does: its descriptor, and KSampler's settings when it
    is a ComfyUI sampler (so the run can be repeated with core KSampler)."""
    descriptor = getattr(expert, "descriptor", expert)
    out = dataclasses.asdict(descriptor) if dataclasses.is_dataclass(descriptor) else {"name": str(descriptor)}
    sampler_name = getattr(expert, "sampler_name", "")
    if sampler_name:
        out["ksampler"] = {"sampler_name": sampler_name, "scheduler": getattr(expert, "scheduler", ""),
                           "steps": int(out.get("steps", 0))}
    return out


def explain(selection: Any, pool: Sequence[Any], priority: float, report: Any = None) -> dict:
    """Per-expert expectations and the pick's lead; ``selection`` None (forced) gives no ranking."""
    names = [getattr(getattr(e, "descriptor", e), "name", str(e)) for e in pool]
    per_call = None
    if report is not None and getattr(report, "nfe", 0) > 0 and getattr(report, "seconds", 0) > 0:
        per_call = float(report.seconds) / float(report.nfe)
    out: dict[str, Any] = {"priority": round(float(priority), 4), "priority_words": priority_words(priority),
                           "forced": selection is None, "experts": [], "lead": None, "runner_up": None}
    if selection is None:
        out["summary"] = "forced with mode: the router did not choose"
        return out
    for i, name in enumerate(names):
        calls = expected_calls(selection.predicted_cost[i])
        out["experts"].append({
            "expert": name,
            "expected_quality": round(float(selection.predicted_quality[i]), 4),
            "expected_calls": calls,
            "expected_seconds": None if per_call is None else round(per_call * calls, 3),
            "score": round(float(selection.utilities[i]), 4),
            "picked": i == selection.index,
        })
    order = sorted(range(len(names)), key=lambda k: -selection.utilities[k])
    others = [k for k in order if k != selection.index]
    if others:
        best_other = others[0]
        gap = float(selection.utilities[selection.index] - selection.utilities[best_other])
        out["lead"], out["runner_up"] = round(gap, 4), names[best_other]
    pick = out["experts"][selection.index]
    words = lead_words(out["lead"])
    if out["runner_up"] is not None and out["lead"] is not None and out["lead"] < 0:
        words = f"drawn by exploration (temperature); {out['runner_up']} scored higher"
    elif out["runner_up"] is not None:
        words = f"{words} over {out['runner_up']} ({out['lead']:+.3f})"
    out["summary"] = (f"{pick['expert']}: expected quality {pick['expected_quality']:.2f} for about "
                      f"{pick['expected_calls']} model calls at priority {priority:.2f} ({out['priority_words']}); "
                      f"{words}")
    return out


def record_details(selection: Any, pool: Sequence[Any], priority: float, router: dict, expert: Any,
                   report: Any = None) -> dict:
    """:func:`explain`, the router's name and version and the settings of ``expert`` (or just its
    name when it is a plain string). Without ``report`` (the stats row, prepared before the run)
    there are no time estimates; with it (the node's payload) they come from the run's seconds."""
    details = explain(selection, pool, priority, report)
    details["router"] = router
    details["settings"] = {"name": expert} if isinstance(expert, str) else settings(expert)
    return details


def text_lines(why: dict, run: dict) -> list[str]:
    """A fixed-width table of :func:`explain`'s data, for ``ui.text`` and the node's text box."""
    lines = [why.get("summary", "")]
    if why["experts"]:
        lines.append(f"{'':2}{'expert':<24}{'exp. quality':>13}{'model calls':>12}{'est. time':>10}{'score':>8}")
        for entry in why["experts"]:
            seconds = entry["expected_seconds"]
            lines.append(f"{'>' if entry['picked'] else ' ':2}{entry['expert'][:23]:<24}"
                         f"{entry['expected_quality']:>13.2f}{entry['expected_calls']:>12d}"
                         f"{'n/a' if seconds is None else _seconds(seconds):>10}{entry['score']:>8.3f}")
    lines.append(f"ran: {run['expert']}, {run['nfe']} model calls, {_seconds(run['seconds'])}"
                 + (" (fallback)" if run.get("fallback") else "") + f"; router {run['router']}")
    return lines


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s" if s >= 1 else f"{s * 1000:.0f} ms"


# ------------------------------------------------------------------------------------- chart

SCALE = 2
INK, MUTED, BAR, PICK, GRID = "#222222", "#6b6b6b", "#9db4cf", "#0072B2", "#e4e4e4"


@functools.lru_cache(maxsize=8)
def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: float) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def why_chart(why: dict, run: dict, width: int = 520) -> Image.Image:
    """Bars of expected quality per expert (the pick highlighted), model calls and time as text."""
    s = SCALE
    experts = why["experts"] or [{"expert": run["expert"], "expected_quality": None, "expected_calls": run["nfe"],
                                  "expected_seconds": run["seconds"], "picked": True}]
    row, pad = 24 * s, 10 * s
    title_font, font, small = _font(15 * s), _font(12 * s), _font(11 * s)
    header = 3 * 18 * s + pad
    height = header + row * len(experts) + 30 * s
    image = Image.new("RGB", (width * s, height), "white")
    draw = ImageDraw.Draw(image)
    title = f"Why {run['expert']}" + (" (fallback)" if run.get("fallback") else "")
    draw.text((pad, pad), _fit(draw, title, title_font, image.width - 2 * pad), font=title_font, fill=INK)
    if why.get("forced"):
        subtitle = "forced with mode: the router did not choose"
    else:
        subtitle = f"priority {why['priority']:.2f} ({why['priority_words']}); router {run['router']}"
    draw.text((pad, pad + 20 * s), _fit(draw, subtitle, small, image.width - 2 * pad), font=small, fill=MUTED)
    lead = why.get("lead")
    if lead is not None:
        note = f"lead over {why['runner_up']}: {lead:+.3f} ({lead_words(lead) if lead >= 0 else 'exploration'})"
        draw.text((pad, pad + 36 * s), _fit(draw, note, small, image.width - 2 * pad), font=small, fill=MUTED)
    name_w, text_w = 150 * s, 150 * s
    left, right = pad + name_w, image.width - pad - text_w
    top = header
    for x in (0.0, 0.5, 1.0):
        gx = left + x * (right - left)
        draw.line([(gx, top - 4 * s), (gx, top + row * len(experts))], fill=GRID, width=s)
    for k, entry in enumerate(experts):
        y = top + k * row
        colour = PICK if entry["picked"] else BAR
        indent = 12 * s
        if entry["picked"]:  # a drawn triangle: the default font has no arrow glyphs
            cy = y + row / 2
            draw.polygon([(pad, cy - 5 * s), (pad, cy + 5 * s), (pad + 8 * s, cy)], fill=PICK)
        draw.text((pad + indent, y + 5 * s), _fit(draw, entry["expert"], font, name_w - indent - 6 * s), font=font,
                  fill=INK if entry["picked"] else MUTED)
        quality = entry["expected_quality"]
        if quality is not None and math.isfinite(quality):
            draw.rectangle([left, y + 4 * s, left + max(quality, 0.0) * (right - left), y + row - 4 * s], fill=colour)
            draw.text((left + 4 * s, y + 6 * s), f"{quality:.2f}", font=small,
                      fill="white" if quality > 0.15 else INK)
        seconds = entry["expected_seconds"]
        info = f"{entry['expected_calls']} calls" + ("" if seconds is None else f", ~{_seconds(seconds)}")
        draw.text((right + 6 * s, y + 6 * s), _fit(draw, info, small, text_w - 8 * s), font=small, fill=INK)
    footer = "bars: expected quality (0-1); calls and time: expected for this image"
    if why.get("forced"):
        footer = "measured: model calls and time of this run"
    draw.text((pad, top + row * len(experts) + 8 * s), _fit(draw, footer, small, image.width - 2 * pad),
              font=small, fill=MUTED)
    return image.resize((width, height // s), Image.LANCZOS)
