"""Stage timing: the seconds each stage spent travel with the rows, whatever later stages regroup."""
import time

import numpy as np

from pipeline.timing import block_seconds, breakdown, column, timed


@timed("read")
def read(batch):
    """A generator that regroups: one input batch of 4 rows -> two output batches of 3 and 1."""
    time.sleep(0.02)
    yield {"x": batch["x"][:3]}
    time.sleep(0.02)
    yield {"x": batch["x"][3:]}


@timed("decode")
def explode(batch):
    """1 row -> 2 rows, dropping every column it does not know (as the video decoder does)."""
    time.sleep(0.01)
    return {"x": np.repeat(batch["x"], 2)}


class Model:
    @timed("model")
    def __call__(self, batch):
        time.sleep(0.01)
        return batch


def test_seconds_follow_the_rows_through_regrouping_stages():
    batches = list(read({"x": np.arange(4)}))
    assert [len(b["x"]) for b in batches] == [3, 1]
    read_total = sum(float(b[column("read")].sum()) for b in batches)
    assert 0.04 <= read_total < 0.5  # the generator's own sleeps, not the consumer's time
    out = [Model()(explode(b)) for b in batches]
    assert [len(b["x"]) for b in out] == [6, 2]
    seconds = {}
    for b in out:
        for stage, s in block_seconds(b).items():
            seconds[stage] = seconds.get(stage, 0) + s
    assert abs(seconds["read"] - read_total) < 1e-9  # carried through a stage that dropped the column
    assert 0.02 <= seconds["decode"] < 0.5 and 0.02 <= seconds["model"] < 0.5
    assert all(len(b[column("model")]) == len(b["x"]) for b in out)


class DecodingModel:
    """A model actor that decodes its own batch: the decode seconds are not the model's."""

    @timed("model")
    def __call__(self, batch):
        batch = explode(batch)  # 10 ms of decode
        time.sleep(0.03)
        return batch


def test_a_stage_run_inside_another_keeps_its_own_seconds():
    t = time.perf_counter()
    out = DecodingModel()({"x": np.arange(2), column("read"): np.full(2, 0.5)})
    elapsed = time.perf_counter() - t
    seconds = block_seconds(out)
    assert len(out["x"]) == 4 and seconds["read"] == 1.0  # carried, through a stage that dropped it
    assert seconds["decode"] >= 0.01 and seconds["model"] >= 0.03
    assert seconds["decode"] + seconds["model"] <= elapsed  # decode's 10 ms counted once, not twice


def test_the_busiest_stage_bounds_the_run_and_the_suggestion_fits_it():
    cpu = breakdown({"read": 1.0, "decode": 20.0, "model": 40.0, "write": 1.0}, 1000, 45.0,
                    {"read": 2, "decode": 2, "model": 1, "write": 2}, gpu=False)
    assert cpu["bound"] == "model" and "GPUs" in cpu["suggestion"]
    assert cpu["stages"]["decode"] == {"busy_s": 20.0, "workers": 2, "samples_per_s": 100.0, "busy_share": 0.222}
    gpu = breakdown({"read": 5.0, "decode": 300.0, "model": 20.0, "write": 2.0}, 100000, 45.0,
                    {"read": 8, "decode": 8, "model": 1, "write": 8}, gpu=True)
    assert gpu["bound"] == "decode" and "max_decode_cpus" in gpu["suggestion"]
    assert breakdown({}, 0, 1.0, {}, gpu=False) == {"stages": {}, "bound": None, "suggestion": ""}
