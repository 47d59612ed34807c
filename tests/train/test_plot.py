"""curves_png: a PNG of the learning curves for classifier and autoencoder metrics, drawn
without a display, legible for one epoch and without validation."""
import io
import math

import numpy as np
import pytest
from PIL import Image

from pipeline.train.plot import curves_png, panels_for

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def supervised(epochs=12):
    return [{"epoch": e, "train_loss": 2 * math.exp(-e / 4) + 0.1, "val_loss": 2.1 * math.exp(-e / 5) + 0.2,
             "train_acc": 1 - 0.9 * math.exp(-e / 3), "val_acc": 0.9 - 0.8 * math.exp(-e / 3),
             "seconds": 1.5, "samples_per_s": 800.0} for e in range(1, epochs + 1)]


def autoencoder(epochs=6):
    return [{"epoch": e, "train_loss": 0.05 / e, "val_loss": 0.06 / e, "samples_per_s": 900.0}
            for e in range(1, epochs + 1)]


def image(data: bytes) -> Image.Image:
    assert data[:8] == PNG_MAGIC
    img = Image.open(io.BytesIO(data))
    img.load()  # decodes every pixel: a truncated PNG fails here
    assert img.format == "PNG" and img.size == (800, 350)
    return img.convert("RGB")


def coloured_pixels(img: Image.Image) -> int:
    """Pixels clearly not grey (the curves and markers; text, axes and grid are grey or black)."""
    px = np.asarray(img, dtype=np.int16)
    return int(((px.max(axis=2) - px.min(axis=2)) > 60).sum())


@pytest.mark.parametrize("metrics", [supervised(), autoencoder()], ids=["supervised", "autoencoder"])
def test_renders_a_png_with_curves(metrics):
    assert coloured_pixels(image(curves_png(metrics, "demo head"))) > 500


def test_the_keys_decide_the_panels():
    assert panels_for(supervised()) == [("loss", "cross-entropy loss"), ("acc", "accuracy")]
    assert panels_for(autoencoder()) == [("loss", "reconstruction error (MSE)")]
    no_val = [{k: v for k, v in row.items() if not k.startswith("val_")} for row in supervised(3)]
    assert panels_for(no_val) == panels_for(supervised())
    assert panels_for([]) == [("loss", "loss")]


def test_one_epoch_without_validation_is_still_visible():
    one = [{"epoch": 1, "train_loss": 0.7, "val_loss": None, "train_acc": 0.5, "val_acc": None, "samples_per_s": 9.0}]
    assert coloured_pixels(image(curves_png(one, "one epoch"))) > 20  # markers, not an invisible line


def test_gaps_and_empty_metrics_render():
    rows = supervised(5)
    rows[2]["val_loss"] = rows[2]["val_acc"] = None
    image(curves_png(rows, "a gap in validation"))
    image(curves_png([], "nothing yet"))



HOSTILE = ["cost$_$model", "$", "$$", "a_b^c{d}$", "\\frac{1}{0}$", "$\\undefined{$", "\\", "^_^", "{}}{", "50$ & 5%",
           "$x^2$ \\n\n$", "tab\there"]


@pytest.mark.parametrize("name", HOSTILE)
def test_any_name_is_plain_text_in_the_title(name):
    """matplotlib's mathtext would parse `$...$` (and crash on `cost$_$model`): the title is plain."""
    assert coloured_pixels(image(curves_png(supervised(3), f"{name} (mlp)"))) > 100


def test_plain_text_even_where_matplotlibrc_asks_for_tex():
    import matplotlib

    with matplotlib.rc_context({"text.usetex": True}):  # no TeX here: it would fail to run
        image(curves_png(supervised(2), "cost$_$model"))
