"""The row contract's check of features as stored (rows.fail_nonfinite), on hand-built batches."""
import numpy as np

from pipeline.rows import fail_nonfinite, ragged


def batch(n, failed=()):
    stage = np.array(["decode" if i in failed else "" for i in range(n)], dtype=object)
    return {"error_stage": stage, "error_type": stage.copy(), "error_message": stage.copy()}


def test_only_values_that_are_not_finite_as_stored_fail_their_row():
    values = np.ones((6, 3), np.float32)
    values[1, 0] = 65510  # rounds to float16's largest, 65504: finite
    values[2, 2] = -65520  # rounds to -inf
    values[3, 1] = np.nan
    values[4, 0] = np.inf  # a row that failed earlier keeps its own error
    b = batch(6, failed={4})
    stored = fail_nonfinite(b, {"feature": values}, np.float16, "model")
    assert stored["feature"].dtype == np.float16 and stored["feature"].shape == (6, 3)
    assert list(b["error_stage"]) == ["", "", "model", "model", "decode", ""]
    assert list(b["error_message"][2:4]) == [
        "feature: 1 of 3 values overflow float16 (largest 65504): use output.dtype float32",
        "feature: 1 of 3 values are NaN or inf"]
    assert fail_nonfinite(batch(3), {"feature": values[:3]}, np.float32, "m")["feature"].dtype == np.float32


def test_ragged_columns_and_empty_batches():
    clips = ragged([np.ones((2, 4), np.float32), np.full((3, 4), 1e6, np.float32), np.zeros((0, 4), np.float32)])
    b = batch(3)
    assert fail_nonfinite(b, {"frame_features": clips}, np.float16, "model") == {}  # nothing dense to store
    assert list(b["error_stage"]) == ["", "model", ""]
    assert b["error_message"][1] == "frame_features: 12 of 12 values overflow float16 (largest 65504): " \
                                    "use output.dtype float32"
    empty = fail_nonfinite(batch(0), {"feature": np.zeros((0, 8), np.float32)}, np.float16, "model")
    assert empty["feature"].shape == (0, 8)
