"""Line charts drawn with PIL (igpt has no plotting dependency), written as PNG."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# Distinguishable on white and in greyscale print (a subset of the Tableau 10 colours).
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))
REFERENCE_COLOUR = (110, 110, 110)
_MARGIN = {"left": 70, "right": 25, "top": 45, "bottom": 55}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def nice_ticks(low: float, high: float, target: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / max(target - 1, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    count = math.ceil((high - first) / step - 1e-9)
    return [round(first + i * step, 10) for i in range(count + 1)]


def _label(value: float) -> str:
    return f"{value:g}"


def _dashed(draw, start, end, colour, width=2, dash=8):
    (x0, y0), (x1, y1) = start, end
    length = math.hypot(x1 - x0, y1 - y0)
    for i in range(0, int(length), 2 * dash):
        a, b = i / length, min(i + dash, length) / length
        draw.line(
            [(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
            fill=colour,
            width=width,
        )


def line_chart(
    path: str | os.PathLike,
    x: Sequence[float],
    series: dict[str, Sequence[float]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    references: dict[str, float] | None = None,
    highlight_x: float | None = None,
    size: tuple[int, int] = (800, 500),
) -> Path:
    """Draw each of `series` (name -> y values at `x`) as a line with markers and write a PNG.

    `references` are named horizontal dashed lines (e.g. a baseline); `highlight_x` gets a
    dotted vertical line (e.g. the best layer). Returns the path written.
    """
    if not series or any(len(ys) != len(x) for ys in series.values()) or not len(x):
        raise ValueError("line_chart needs at least one point and series as long as x")
    references = references or {}
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(12)
    left, top = _MARGIN["left"], _MARGIN["top"]
    right, bottom = width - _MARGIN["right"], height - _MARGIN["bottom"]

    values = [v for ys in series.values() for v in ys] + list(references.values())
    y_ticks = nice_ticks(min(values), max(values))
    x_ticks = nice_ticks(min(x), max(x), target=min(len(x), 10) if len(x) > 1 else 2)
    if all(float(v).is_integer() for v in x):  # layer numbers: integer ticks only
        x_ticks = sorted({int(round(t)) for t in x_ticks})
    x_lo, x_hi = min(x_ticks[0], min(x)), max(x_ticks[-1], max(x))
    y_lo, y_hi = y_ticks[0], y_ticks[-1]

    def px(value):
        return left + (value - x_lo) / ((x_hi - x_lo) or 1.0) * (right - left)

    def py(value):
        return bottom - (value - y_lo) / ((y_hi - y_lo) or 1.0) * (bottom - top)

    for tick in y_ticks:
        draw.line([(left, py(tick)), (right, py(tick))], fill=(232, 232, 232))
        draw.text((left - 8, py(tick)), _label(tick), fill="black", font=small, anchor="rm")
    for tick in x_ticks:
        draw.line([(px(tick), bottom), (px(tick), bottom + 5)], fill="black")
        draw.text((px(tick), bottom + 8), _label(tick), fill="black", font=small, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) / 2, 12), title, fill="black", font=font, anchor="mt")
    draw.text(((left + right) / 2, height - 8), xlabel, fill="black", font=font, anchor="mb")
    label = Image.new("RGB", (bottom - top, 22), "white")
    ImageDraw.Draw(label).text(
        ((bottom - top) / 2, 11), ylabel, fill="black", font=font, anchor="mm"
    )
    image.paste(label.rotate(90, expand=True), (4, top))

    if highlight_x is not None:
        for y0 in range(top, bottom, 8):
            draw.line([(px(highlight_x), y0), (px(highlight_x), y0 + 3)], fill=(160, 160, 160))
    legend = []
    for name, level in references.items():
        _dashed(draw, (left, py(level)), (right, py(level)), REFERENCE_COLOUR)
        legend.append((name, REFERENCE_COLOUR, True))
    for i, (name, ys) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        points = [(px(a), py(b)) for a, b in zip(x, ys, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for cx, cy in points:
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
        legend.append((name, colour, False))

    # Legend in the lower right corner of the plot area, on a white box.
    row = 18
    box_w = 34 + max(draw.textlength(name, font=small) for name, _, _ in legend)
    x0, y0 = right - box_w - 10, bottom - 10 - row * len(legend)
    draw.rectangle([x0, y0 - 4, right - 10, bottom - 6], fill="white", outline=(180, 180, 180))
    for i, (name, colour, dashed) in enumerate(legend):
        y = y0 + i * row + row / 2
        if dashed:
            _dashed(draw, (x0 + 6, y), (x0 + 26, y), colour, dash=4)
        else:
            draw.line([(x0 + 6, y), (x0 + 26, y)], fill=colour, width=2)
        draw.text((x0 + 30, y), name, fill="black", font=small, anchor="lm")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
