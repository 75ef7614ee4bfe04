"""Pictures (igpt/figures.py): grids, sample sheets, charts."""

import numpy as np
from PIL import Image

from igpt import figures


def test_image_helpers():
    tiles = np.arange(2 * 3 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 3, 2, 2, 3)
    picture = figures.grid(tiles, pad=1)
    assert picture.shape == (1 + 2 * 3, 1 + 3 * 3, 3)
    np.testing.assert_array_equal(picture[4:6, 7:9], tiles[1, 2])
    assert figures.auto_scale(32) == 3 and figures.auto_scale(200) == 1
    big = figures.upscale(tiles[0, 0], 3)
    assert big.shape == (6, 6, 3) and np.all(big[:3, :3] == tiles[0, 0, 0, 0])
    # 3 images of 2x2 -> 2 columns, 2 rows (one blank tile), 2-pixel gaps
    assert figures.sample_sheet(tiles[0], 1).shape == (2 + 2 * 4, 2 + 2 * 4, 3)


def test_line_chart_draws_every_series_and_the_reference(tmp_path):
    path = figures.line_chart(
        tmp_path / "chart.png", [0, 1, 2], {"a": [1.0, 2.0, 1.5], "b": [0.5, 1.0, 2.0]},
        references={"baseline": 1.2}, highlight_x=1,
    )  # fmt: skip
    with Image.open(path) as image:
        assert image.size == (800, 500)
        colours = {c for _, c in image.convert("RGB").getcolors(1 << 20)}
    assert {*figures.COLOURS[:2], figures.REFERENCE_COLOUR} <= colours
