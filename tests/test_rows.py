"""The row contract on hand-built batches: how a failed sample's row is filled (rows.error_fields) and
the check of features as stored (rows.fail_nonfinite)."""
import numpy as np

from pipeline.errors import DecodeFailure, ReadFailure, SampleError
from pipeline.extract.decode import DecodeError
from pipeline.extract.fetch import ReadTimeout
from pipeline.extract.isolate import ChildError, DecodeTimeout
from pipeline.extract.shards import TooLarge
from pipeline.extract.video import VideoDecodeError
from pipeline.rows import error_fields, fail_nonfinite, ragged


def batch(n, failed=()):
    stage = np.array(["decode" if i in failed else "" for i in range(n)], dtype=object)
    return {"error_stage": stage, "error_type": stage.copy(), "error_message": stage.copy()}


def test_an_error_row_names_the_sample_errors_own_type_and_stage():
    """A SampleError carries its row's error_type and stage; the catcher's stage is only the fallback."""
    def row(stage, exc):
        fields = error_fields(stage, exc)
        return fields["error_stage"], fields["error_type"], fields["error_message"]

    assert row("read", TooLarge("member a.jpg holds 9 bytes")) == ("read", "too_large", "member a.jpg holds 9 bytes")
    assert row("read", ReadTimeout("s3://b/k: no data")) == ("read", "timeout", "s3://b/k: no data")
    assert row("decode", DecodeError("empty file (0 bytes)")) == ("decode", "DecodeError", "empty file (0 bytes)")
    assert row("decode", ChildError("UnidentifiedImageError", "no")) == ("decode", "UnidentifiedImageError", "no")
    assert row("decode", DecodeTimeout("no result within 1 s"))[:2] == ("decode", "timeout")
    # the class's stage, wherever it is caught; a raiser's stage over the class's; the catcher's as the last
    assert row("model", VideoDecodeError("no frames"))[:2] == ("decode", "VideoDecodeError")
    assert row("model", SampleError("x", "late", stage="apply"))[:2] == ("apply", "late")
    assert row("temporal", SampleError("x"))[:2] == ("temporal", "SampleError")
    # any other exception: its class's name, in the catcher's stage, credentials masked
    assert row("model", RuntimeError("CUDA out of memory")) == ("model", "RuntimeError", "CUDA out of memory")
    assert row("read", FileNotFoundError("s3://k:secret@b/a.jpg"))[2] == "s3://k:***@b/a.jpg"
    assert row("read", ValueError()) == ("read", "ValueError", "ValueError()")
    assert all(issubclass(c, ReadFailure) for c in (TooLarge, ReadTimeout))
    assert all(issubclass(c, DecodeFailure) for c in (DecodeError, ChildError, DecodeTimeout, VideoDecodeError))


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
    assert list(b["error_type"]) == ["", "", "NonFiniteFeature", "NonFiniteFeature", "decode", ""]
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
