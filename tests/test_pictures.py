"""Pictures people look at: grids laid out by aspect with readable, wrapped labels; plots that do not exaggerate."""

import numpy as np
from PIL import Image

from inference.grids import _font, make_grid, wrap


def test_grid_keeps_each_image_readable_whatever_its_size_and_aspect():
    tiny, strip = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (992, 64), "blue")
    grid = make_grid([tiny, strip], labels=["a 64 px render", "a banner"], height=256)
    pixels = np.asarray(grid)
    reds = int(np.all(pixels == (255, 0, 0), axis=-1).sum())
    # the 64 px render is shown at the row height (nearest neighbour), not as a stamp
    assert reds >= 250 * 250
    blues = int(np.all(pixels == (0, 0, 255), axis=-1).sum())
    assert blues >= 768 * 49  # the strip gets up to 3x the row height in width, not a square cell
    assert grid.width <= 1800


def test_labels_wrap_instead_of_being_cut():
    prompt = "zxq logo, a #E4572E ring mark with a bar, centred, on a white background"
    lines = wrap(prompt + "\nseed 3", _font(), 256)
    assert (
        " ".join(lines).replace(" seed 3", "") == prompt
        and lines[-1] == "seed 3"
        and len(lines) >= 3
    )
    assert len(wrap("word " * 200, _font(), 256)) == 4 and wrap("word " * 200, _font(), 256)[
        -1
    ].endswith("…")


def test_plots_show_at_least_a_noticeable_colour_difference():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evaluation.report import MIN_SPAN, _honest_axis

    fig, ax = plt.subplots()
    ax.plot([0, 1], [23.2, 23.5])  # a 0.3 dE change
    _honest_axis(ax, "colour_delta_e")
    low, high = ax.get_ylim()
    assert high - low >= MIN_SPAN["colour_delta_e"] == 5.0
    plt.close(fig)
