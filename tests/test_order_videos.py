"""make_order_videos: real encoded videos whose two classes hold the same frames in a different
order, so the clip's mean content is the same and only the sequence tells them apart. featurize
reads them (their splits, their frame features with the halves swapped) in test_video_end_to_end's
UCF-101 run, which holds them as two more classes."""
import os

import numpy as np
import pytest

from pipeline.samples import make_order_videos

CLASSES = ("a_then_b", "b_then_a")


@pytest.fixture(scope="module")
def order(tmp_path_factory):
    folder = tmp_path_factory.mktemp("order")
    return str(folder), make_order_videos(str(folder), n=8, frames=16, size=64, seed=3)


def decode(path):
    import av

    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float32)


def listed(path):
    with open(path) as f:
        return f.read().split()


def test_layout_and_split_lists(order):
    folder, info = order
    assert info["videos"] == 8 and info["classes"] == 2 and info["counts"] == {"train": 4, "test": 4}
    train, test = listed(info["split_files"]["train"]), listed(info["split_files"]["test"])
    assert not set(train) & set(test)
    on_disk = sorted(f"{c}/{n}" for c in CLASSES for n in os.listdir(os.path.join(folder, c)))
    assert sorted(train + test) == on_disk and len(on_disk) == 8
    # both versions of a scene are in the same split, and each split holds both classes equally
    for names in (train, test):
        scenes = {c: sorted(n.split("_s")[-1] for n in names if n.startswith(c)) for c in CLASSES}
        assert scenes[CLASSES[0]] == scenes[CLASSES[1]] and len(scenes[CLASSES[0]]) == 2


def test_same_content_different_order(order):
    folder, info = order
    clips = {c: [decode(os.path.join(folder, c, n)) for n in sorted(os.listdir(os.path.join(folder, c)))]
             for c in CLASSES}
    assert all(clip.shape == (16, 64, 64, 3) for cs in clips.values() for clip in cs)
    for a, b in zip(clips[CLASSES[0]], clips[CLASSES[1]]):  # the same scene in both orders
        # the mean frame (what mean pooling sees) is the same; the halves are swapped
        same = np.abs(a.mean(0) - b.mean(0)).mean()
        halves = np.abs(a[:8].mean(0) - a[8:].mean(0)).mean()
        swapped = np.abs(a[:8].mean(0) - b[8:].mean(0)).mean()
        assert same < 0.1 * halves and swapped < 0.1 * halves, (same, halves, swapped)
        # red first in class a: the first half is redder than bluer, the second half the reverse
        red_minus_blue = lambda x: float((x[..., 0] - x[..., 2]).mean())  # noqa: E731
        assert red_minus_blue(a[:8]) > 1 > -1 > red_minus_blue(a[8:])
        assert red_minus_blue(b[:8]) < -1 < 1 < red_minus_blue(b[8:])
    # over each class: the mean colour per channel of the mean frame agrees far better than halves do
    mean_colour = {c: np.mean([x.mean((0, 1, 2)) for x in cs], axis=0) for c, cs in clips.items()}
    first_half = np.mean([x[:8].mean((0, 1, 2)) for x in clips[CLASSES[0]]], axis=0)
    second_half = np.mean([x[8:].mean((0, 1, 2)) for x in clips[CLASSES[0]]], axis=0)
    between_classes = np.abs(mean_colour[CLASSES[0]] - mean_colour[CLASSES[1]]).max()
    assert between_classes < 0.1 * np.abs(first_half - second_half).max()


def test_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="even n"):
        make_order_videos(str(tmp_path), n=7)
    with pytest.raises(ValueError, match="2 classes"):
        make_order_videos(str(tmp_path), classes=("a", "b", "c"))
