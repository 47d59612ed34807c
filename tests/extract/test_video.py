"""Video sampling, decoding (decord, PyAV fallback) and isolation, on videos PyAV encodes here."""
import io
import os
import signal
import time

import numpy as np
import pytest

from pipeline.config import VideoConfig
from pipeline.extract.isolate import ChildError, DecoderCrashed, DecoderUnavailable, DecodeTimeout, IsolatedCall
from pipeline.extract.video import (
    FrameSpec,
    VideoDecodeError,
    _decode_pyav,
    center_crop,
    decode_video,
    plan_windows,
    stream_video,
)
from pipeline.samples import encode_video

SPEC = FrameSpec(resize=128, crop=112)


@pytest.fixture(scope="module")
def ucf_like():
    """MPEG-4 Part 2 in AVI, 320x240 at 25 fps, 3 s: as UCF101's clips are."""
    return encode_video(75)


def test_uniform_sampling_takes_segment_centres():
    (w,) = plan_windows(100, 25.0, VideoConfig(num_frames=4))
    assert list(w.frames) == [12, 37, 62, 87]
    assert (w.start_s, w.end_s, w.real_frames) == (0.0, 4.0, 4)


def test_short_videos_repeat_frames_and_record_the_real_count():
    (w,) = plan_windows(3, 25.0, VideoConfig(num_frames=8))
    assert len(w.frames) == 8 and set(w.frames) == {0, 1, 2}
    assert w.real_frames == 3


def test_fps_every_and_all_sampling():
    assert list(plan_windows(50, 25.0, VideoConfig(sampling="fps", fps=5))[0].frames) == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45]
    assert list(plan_windows(10, 25.0, VideoConfig(sampling="every", every=4))[0].frames) == [0, 4, 8]
    assert len(plan_windows(30, 25.0, VideoConfig(sampling="all"))[0].frames) == 30


def test_max_frames_bounds_every_window():
    (w,) = plan_windows(25 * 600, 25.0, VideoConfig(sampling="all", max_frames=64))
    assert len(w.frames) == 64 and w.frames[0] == 0 and w.frames[-1] == 25 * 600 - 1


def test_windows_and_strides():
    windows = plan_windows(250, 25.0, VideoConfig(num_frames=2, window_s=4.0, stride_s=2.0))  # a 10 s video
    assert [(w.start_s, w.end_s) for w in windows] == [(0.0, 4.0), (2.0, 6.0), (4.0, 8.0), (6.0, 10.0)]
    assert list(windows[1].frames) == [75, 125]
    (whole,) = plan_windows(50, 25.0, VideoConfig(window_s=4.0))  # shorter than one window
    assert (whole.start_s, whole.end_s) == (0.0, 2.0)


def test_decord_frames_match_pyav_frames(ucf_like):
    cfg = VideoConfig(num_frames=8)
    (ours,) = decode_video(ucf_like, SPEC, cfg)
    (ref,) = _decode_pyav(ucf_like, SPEC, cfg)
    assert ours.decoder == "decord" and ref.decoder == "pyav"
    assert ours.pixels.shape == ref.pixels.shape == (8, 112, 112, 3)
    assert list(ours.window.frames) == list(ref.window.frames)
    diff = np.abs(ours.pixels.astype(int) - ref.pixels.astype(int)).mean()
    assert diff < 6, diff
    # and the sampled frames are really different frames of the clip
    assert np.abs(ours.pixels[0].astype(int) - ours.pixels[-1].astype(int)).mean() > 10


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("mpeg4.avi", {"codec": "mpeg4", "fmt": "avi"}),
        ("h264.mkv", {"codec": "libx264", "fmt": "matroska"}),
        ("vp9.webm", {"codec": "libvpx-vp9", "fmt": "webm"}),
        ("h264.mp4", {"codec": "libx264", "fmt": "mp4"}),
        ("odd_321x241.avi", {"width": 321, "height": 241}),
        ("vfr.mp4", {"codec": "libx264", "fmt": "mp4", "pts_jitter": True}),
        ("three_frames.avi", {"frames": 3}),
    ],
)
def test_containers_and_codecs_decode(name, kwargs):
    kwargs = {"frames": 40, **kwargs}
    (clip,) = decode_video(encode_video(**kwargs), SPEC, VideoConfig(num_frames=16))
    assert clip.pixels.shape == (16, 112, 112, 3) and clip.pixels.dtype == np.uint8
    assert clip.window.real_frames == min(16, kwargs["frames"])
    assert clip.fps > 0


@pytest.mark.parametrize(
    "data",
    [b"", os.urandom(20000), b"this is a text file, not a video\n" * 50],
    ids=["zero_bytes", "random_bytes", "text"],
)
def test_garbage_is_a_clear_error(data):
    with pytest.raises(VideoDecodeError):
        decode_video(data, SPEC, VideoConfig())


def test_mp4_cut_before_its_index_is_an_error():
    data = encode_video(50, codec="libx264", fmt="mp4")  # moov (the index) is written at the end
    with pytest.raises(VideoDecodeError, match="decord.*pyav"):
        decode_video(data[: len(data) // 2], SPEC, VideoConfig())


def test_corrupted_middle_decodes_or_fails_cleanly():
    data = bytearray(encode_video(50, codec="libx264", fmt="mp4"))
    mid = len(data) // 2
    data[mid : mid + 2000] = os.urandom(2000)
    try:
        (clip,) = decode_video(bytes(data), SPEC, VideoConfig())
        assert clip.pixels.shape == (16, 112, 112, 3)
    except VideoDecodeError as e:
        assert str(e)


def test_1080p_video_decodes_within_a_fixed_bound():
    data = encode_video(16, width=1920, height=1080, codec="libx264", fmt="mp4")  # 8 of its 16 frames sampled
    (clip,) = decode_video(data, SPEC, VideoConfig(num_frames=8))
    assert clip.pixels.shape == (8, 112, 112, 3)  # scaled in the decoder, never held at 1080p


# ------------------------------------------------------------------ isolation


def hang(*args):
    time.sleep(60)


def segfault(*args):
    os.kill(os.getpid(), signal.SIGSEGV)


def fail(*args):
    raise ValueError("bad file")


def test_a_hanging_decoder_is_stopped_after_its_time_limit():
    with IsolatedCall(hang, timeout_s=1.0) as call:
        t = time.time()
        with pytest.raises(DecodeTimeout):
            call.call(b"x")
        assert time.time() - t < 10


def test_a_crashing_decoder_takes_only_its_file():
    with IsolatedCall(segfault, timeout_s=20) as call:
        with pytest.raises(DecoderCrashed):
            call.call(b"x")


def test_the_decoder_goes_on_after_errors(ucf_like):
    with IsolatedCall(decode_video, timeout_s=30) as call:
        with pytest.raises(ChildError) as err:
            call.call(b"", SPEC, VideoConfig())
        assert err.value.error_type == "VideoDecodeError"
        (clip,) = call.call(ucf_like, SPEC, VideoConfig(num_frames=4))
        assert clip.pixels.shape == (4, 112, 112, 3)
    with IsolatedCall(fail, timeout_s=30) as call:
        with pytest.raises(ChildError, match="bad file"):
            call.call()


def nap():
    time.sleep(2)


def slow_echo(monkeypatch):
    """slow_to_import.echo, imported at once here; the spawned child inherits SLOW_IMPORT_S=3."""
    monkeypatch.setenv("SLOW_IMPORT_S", "0")
    from slow_to_import import echo

    monkeypatch.setenv("SLOW_IMPORT_S", "3")
    return echo


def test_the_decoders_start_up_is_not_charged_to_the_first_file(monkeypatch):
    echo = slow_echo(monkeypatch)  # a 3 s import in the child: longer than the file's limit

    with IsolatedCall(echo, timeout_s=1.0, prepare=nap) as call:  # and a 2 s `prepare`
        assert call.call("first") == "first"


def test_a_decoder_that_cannot_start_fails_the_task_not_the_file(monkeypatch):
    echo = slow_echo(monkeypatch)
    monkeypatch.setenv("FAIL_CHILD_IMPORT", "1")  # the spawned child inherits it; this process has the module
    with IsolatedCall(echo, timeout_s=1.0) as call:
        with pytest.raises(DecoderUnavailable, match="died while starting"):
            call.call("first")


def hang_on_poison(source, spec, cfg):
    """decode_video, except that a file named poison* hangs the decoder."""
    if "poison" in str(source):
        time.sleep(60)
    return decode_video(source, spec, cfg)


def crash_on_poison(source, spec, cfg):
    if "poison" in str(source):
        os.kill(os.getpid(), signal.SIGSEGV)
    return decode_video(source, spec, cfg)


def good_and_poison(folder, video):
    """Two copies of one decodable video; the one named poison* is what a failpoint strikes."""
    good, poison = folder / "good.avi", folder / "poison.avi"
    good.write_bytes(video)
    poison.write_bytes(video)
    return good, poison


def video_batch(*paths):
    """The decode stage's input for local videos: URIs only, no bytes (the decoder opens them)."""
    rows = [{"sample_id": p.name, "uri": str(p), "label": "a", "split": "all", "data": b"",
             "error_stage": "", "error_type": "", "error_message": ""} for p in paths]
    return {k: np.array([row[k] for row in rows], dtype=object) for k in rows[0]}


@pytest.mark.parametrize("target, kind", [(hang_on_poison, "timeout"), (crash_on_poison, "crash")])
def test_the_stage_turns_a_hanging_or_crashing_file_into_one_error_row(tmp_path, ucf_like, monkeypatch, target, kind):
    import pipeline.extract.video as video

    good, poison = good_and_poison(tmp_path, ucf_like)
    call = IsolatedCall(target, timeout_s=3.0)
    monkeypatch.setattr(video, "_DECODER", call)
    try:
        (out,) = video.decode_video_batch(video_batch(poison, good), SPEC,
                                          VideoConfig(num_frames=4, decode_timeout_s=3), windowed=False)
    finally:
        call.close()
    assert list(out["sample_id"]) == ["poison.avi", "good.avi"]
    assert list(out["error_stage"]) == ["decode", ""] and out["error_type"][0] == kind
    assert out["frames"].shape == (2, 4, 112, 112, 3) and out["frames"][1].any()
    assert out["decoder"][1] == "decord" and out["num_frames"][1] == 4


def test_each_job_gets_its_own_decode_time_limit_in_a_reused_worker(tmp_path, ucf_like, monkeypatch):
    """Ray reuses workers across the jobs of one driver: the decoder process a worker kept from a
    job with a 60 s limit must apply the next job's 2 s limit."""
    import json

    import pipeline.extract.video as video

    monkeypatch.setenv("FEATURIZE_FAULTS", str(tmp_path))  # read by the decoder process it spawns
    (tmp_path / "decode.json").write_text(json.dumps({"action": "hang", "match": "poison", "once": False}))
    good, poison = good_and_poison(tmp_path, ucf_like)
    monkeypatch.setattr(video, "_DECODER", None)
    try:
        (first,) = video.decode_video_batch(video_batch(good), SPEC,
                                            VideoConfig(num_frames=4, decode_timeout_s=60), windowed=False)
        assert list(first["error_stage"]) == [""]
        t = time.time()
        (second,) = video.decode_video_batch(video_batch(poison), SPEC,
                                             VideoConfig(num_frames=4, decode_timeout_s=2), windowed=False)
        assert list(second["error_type"]) == ["timeout"] and time.time() - t < 30
    finally:
        if video._DECODER is not None:
            video._DECODER.close()


# ------------------------------------------------------------------ long videos: windows stream


def windowed_batch(folder, video, cfg, batch_bytes):
    """decode_video_batch's output batches for one windowed video, with a fresh decoder."""
    import pipeline.extract.video as video_module

    path = folder / "long.avi"
    path.write_bytes(video)
    video_module._DECODER = None
    try:
        return list(video_module.decode_video_batch(video_batch(path), SPEC, cfg, windowed=True,
                                                    batch_bytes=batch_bytes))
    finally:
        video_module._DECODER.close()
        video_module._DECODER = None


def test_a_long_videos_windows_leave_in_bounded_batches_equal_to_decoding_it_whole(tmp_path, ucf_like):
    cfg = VideoConfig(num_frames=4, window_s=0.4, decode_timeout_s=30)  # a 3 s video: 7 windows
    whole = decode_video(ucf_like, SPEC, cfg)
    clip_bytes = whole[0].pixels.nbytes
    batches = windowed_batch(tmp_path, ucf_like, cfg, batch_bytes=2 * clip_bytes)
    assert [len(b["sample_id"]) for b in batches] == [2, 2, 2, 1]  # never more than 2 windows held
    rows = {k: np.concatenate([b[k] for b in batches]) for k in ("sample_id", "frames", "unit_rows", "start_s")}
    assert list(rows["sample_id"]) == [f"long.avi#w{k}" for k in range(7)]
    assert (rows["unit_rows"] == 7).all()
    assert list(rows["start_s"]) == [c.window.start_s for c in whole]
    assert np.array_equal(rows["frames"], np.stack([c.pixels for c in whole]))


def test_pyav_holds_only_the_frames_of_windows_not_given_yet(ucf_like):
    from pipeline.extract.video import _pyav_clips, _pyav_plan

    cfg = VideoConfig(num_frames=4, window_s=0.4)
    plan = _pyav_plan(ucf_like, cfg)
    clips = _pyav_clips(ucf_like, SPEC, plan)
    given = []
    for clip in clips:
        given.append(clip)
        held = clips.gi_frame.f_locals["kept"] if clips.gi_frame else {}
        assert len(held) <= 2 * cfg.num_frames  # the next window's frames at most, never the video's
    everything = {}  # the reference: every frame of the video, kept
    import av

    with av.open(io.BytesIO(ucf_like)) as container:
        w, h = SPEC.scaled(*plan.size)
        for i, frame in enumerate(container.decode(video=0)):
            everything[i] = frame.to_ndarray(format="rgb24", width=w, height=h)
    assert len(given) == len(plan.windows) == 7
    for clip in given:
        want = center_crop(np.stack([everything[int(i)] for i in clip.window.frames]), SPEC.crop)
        assert np.array_equal(clip.pixels, want)


def three_then_fail(source, spec, cfg):
    """The decoder's stream: a video's first windows, then a failure (a file corrupt past them)."""
    for k, clip in enumerate(stream_video(source, spec, cfg)):
        if k == 3:
            raise ValueError("corrupt past window 3")
        yield clip


def three_then_hang(source, spec, cfg):
    for k, clip in enumerate(stream_video(source, spec, cfg)):
        if k == 3:
            time.sleep(60)
        yield clip


@pytest.mark.parametrize("target, kind", [(three_then_fail, "ValueError"), (three_then_hang, "timeout")])
def test_a_video_failing_after_some_windows_keeps_them_and_the_others_are_error_rows(tmp_path, ucf_like,
                                                                                     monkeypatch, target, kind):
    import pipeline.extract.video as video

    path = tmp_path / "v.avi"
    path.write_bytes(ucf_like)
    call = IsolatedCall(target, timeout_s=3.0)
    monkeypatch.setattr(video, "_DECODER", call)
    try:
        (out,) = video.decode_video_batch(video_batch(path), SPEC, VideoConfig(num_frames=4, window_s=0.4,
                                                                                decode_timeout_s=3), windowed=True)
    finally:
        call.close()
    assert list(out["sample_id"]) == [f"v.avi#w{k}" for k in range(7)]  # one row per window, once each
    assert list(out["error_stage"]) == [""] * 3 + ["decode"] * 4 and set(out["error_type"][3:]) == {kind}
    assert (out["unit_rows"] == 7).all() and out["frames"][:3].any() and not out["frames"][3:].any()
