import pytest
import yaml

from pipeline.config import load_job, output_storage_options, parse_job, redact, to_dict
from pipeline.errors import ConfigError, Refused

from conftest import refusal_lines

BASE = {"name": "t", "source": {"uri": "data/"}, "output": {"uri": "out/"}}


def job(**sections):
    data = {**BASE}
    data.update(sections)
    return data


def test_defaults_fill_in():
    cfg = parse_job(BASE)
    assert cfg.source.format == "image_folder"
    assert cfg.model.pool == "avg" and cfg.model.layer is None
    assert cfg.output.partition_by == ["split"] and cfg.output.dtype == "float16"
    assert cfg.resources.batch_size == "auto"


@pytest.mark.parametrize(
    "data, key",
    [
        (job(model={"pooling": "avg"}), "model.pooling"),
        (job(extra=1), "extra"),
        (job(model={"pool": "mean"}), "model.pool"),
        (job(resources={"batch_size": "big"}), "resources.batch_size"),
        (job(resources={"batch_size": 0}), "resources.batch_size"),
        (job(resources={"actors_per_gpu": 0}), "resources.actors_per_gpu"),
        (job(resources={"decode_on": "gpu_nodes"}), "resources.decode_on"),
        (job(source={"uri": "v", "media": "video"}, resources={"decode_on": "actor"}), "resources.decode_on"),
        (job(resources={"max_decode_cpus": 0.25}), "resources.max_decode_cpus"),
        (job(resources={"task_memory": "lots"}), "resources.task_memory"),
        (job(resources={"actor_memory": "-2GiB"}), "resources.actor_memory"),
        (job(preprocess={"crop": 300, "resize": 256}), "preprocess.crop"),
        (job(preprocess={"crop": "224"}), "preprocess.crop"),
        (job(preprocess={"mean": [0.5, 0.5]}), "preprocess.mean"),
        (job(output={"uri": "o", "dtype": "float64"}), "output.dtype"),
        (job(output={"uri": "o", "partition_by": ["color"]}), "output.partition_by"),
        (job(output={"uri": "o", "file_size": "big"}), "output.file_size: 'big' is not a size"),
        (job(output={"uri": "o", "file_size": 0}), "output.file_size"),
        (job(output={"uri": "o", "file_size": "0.5"}), "output.file_size: '0.5' is not between 1 byte and 1GiB"),
        (job(output={"uri": "o", "file_size": "2GiB"}), "output.file_size: '2GiB' is not between 1 byte and 1GiB"),
        (job(output={"uri": "o", "file_size": True}), "output.file_size"),
        (job(source={"uri": "d", "format": "zip"}), "source.format"),
        (job(source={"uri": "d", "storage_options": "anon"}), "source.storage_options"),
        (job(model={"weights_sha256": "abc"}), "model.weights_sha256"),
        ({"name": "t", "output": {"uri": "o"}}, "source"),
        (job(source={"format": "manifest"}), "source.uri"),
        (job(resources={"batch_size": True}), "resources.batch_size"),
        (job(source={"uri": "d", "split_files": {"train": "t.txt"}}), "source.split_files: only for source.format "
                                                                      "video_folder"),
        (job(source={"uri": "v", "format": "video_folder"}, video={"sampling": "fps", "fps": -2.0},
             temporal=[{"kind": "mean", "name": "mean"}]), "video.fps: required (and positive)"),
        (job(source={"uri": "v", "format": "video_folder"}, video={"sampling": "every", "every": -1},
             temporal=[{"kind": "mean", "name": "mean"}]), "video.every: required (and positive)"),
    ],
)
def test_bad_values_are_refused_naming_the_key(data, key):
    with pytest.raises(ConfigError) as err:
        parse_job(data)
    assert key in str(err.value)


def test_memory_sizes_read_as_bytes():
    from pipeline.config import memory_bytes

    assert memory_bytes("2GiB", "k") == 2 * 2**30
    assert memory_bytes("512 MB", "k") == 512 * 10**6
    assert memory_bytes(1024, "k") == 1024 and memory_bytes(None, "k") is None


def test_output_file_size_defaults_to_auto_and_reads_as_bytes():
    from pipeline.config import file_bytes
    from pipeline.output.sink import image_columns, target_bytes, video_columns

    assert file_bytes(parse_job(BASE).output.file_size, "output.file_size") is None  # auto
    # auto: a 32nd of the run's output (64 bytes of ids a row besides the features), in [1 MiB, 64 MiB]
    resnet50 = image_columns("float16", 2048)  # 4,096 + 8 bytes a row (feature, width, height)
    assert target_bytes(None, 5_000, resnet50) == 2**20  # a laptop's run: 1 MiB files, ~250 rows
    assert target_bytes(None, 1_281_167, resnet50) == 64 * 2**20  # ImageNet: 64 MiB
    assert target_bytes(None, 100_000, resnet50) == 100_000 * (64 + 4096 + 8) // 32
    frames = video_columns("float16", [("clip_mean", 512)], 512)  # 16 frames of 512 float16 a clip
    assert target_bytes(None, 20_000, frames, frames=16) > target_bytes(None, 20_000, frames, frames=1)
    assert target_bytes(8192, 10**9, resnet50) == 8192  # a given size is kept
    assert file_bytes(parse_job(BASE, ["output.file_size=8MiB"]).output.file_size, "k") == 8 * 2**20
    assert file_bytes(1, "k") == 1 and file_bytes("1GiB", "k") == 2**30


def test_overrides_parse_yaml_values():
    cfg = parse_job(BASE, ["model.arch=vgg16", "resources.batch_size=64", "model.layer=features.29",
                           "output.partition_by=[split, label]", "preprocess.resize=null"])
    assert cfg.model.arch == "vgg16"
    assert cfg.resources.batch_size == 64
    assert cfg.model.layer == "features.29"
    assert cfg.output.partition_by == ["split", "label"]
    assert cfg.preprocess.resize is None


def test_override_of_unknown_key_is_refused():
    with pytest.raises(ConfigError, match="model.flavour"):
        parse_job(BASE, ["model.flavour=x"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_job(BASE, ["model.arch"])


def test_a_mistyped_key_or_value_is_refused_with_what_was_meant(tmp_path, capsys):
    with pytest.raises(ConfigError) as e:
        parse_job(job(model={"poool": "avg"}))
    assert str(e.value).startswith("unknown key model.poool (allowed: ") and str(e.value).endswith("; did you mean pool?")
    with pytest.raises(ConfigError, match=r"unknown key model\.layr, model\.poool \(allowed: .*\); did you mean layer, pool\?$"):
        parse_job(BASE, ["model.poool=avg", "model.layr=fc"])  # several: the closest to each
    with pytest.raises(ConfigError, match=r"^unknown key modle \(allowed: .*\); did you mean model\?$"):
        parse_job(job(modle={}))
    with pytest.raises(ConfigError, match=r"^unknown key model\.flavour \(allowed: [a-z0-9_, ]*\)$"):  # none close
        parse_job(BASE, ["model.flavour=x"])
    with pytest.raises(ConfigError, match=r"^model\.pool: 'agv' is not one of avg, max, none; did you mean avg\?$"):
        parse_job(job(model={"pool": "agv"}))
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job(video={"samplng": "uniform"})))
    assert refused(capsys, "run", str(job_file)).endswith("; did you mean sampling?")


def test_load_job_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read job file"):
        load_job(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(str(bad))
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    assert load_job(str(good)).name == "t"


def test_secrets_are_redacted_everywhere_they_nest():
    opts = {"key": "AKIA123", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://x", "aws_session_token": "T0KEN-VALUE"}}
    cfg = parse_job(job(source={"uri": "s3://b/", "storage_options": opts}))
    text = repr(to_dict(cfg))
    for secret in ("AKIA123", "s3cr3t", "T0KEN-VALUE"):
        assert secret not in text
    assert "http://x" in text
    assert redact({"anon": True}) == {"anon": True}


def test_output_inherits_source_storage_options_on_the_same_store_only():
    opts = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}}
    same = parse_job(job(source={"uri": "s3://a/", "storage_options": opts}, output={"uri": "s3://b/out"}))
    assert output_storage_options(same) == opts
    local = parse_job(job(source={"uri": "s3://a/", "storage_options": opts}, output={"uri": "out/"}))
    assert output_storage_options(local) == {}
    own = parse_job(job(source={"uri": "s3://a/", "storage_options": opts}, output={"uri": "s3://b/", "storage_options": {"anon": True}}))
    assert output_storage_options(own) == {"anon": True}


# Issue 12 cases 14 and 15: hostile or malformed YAML is bad input: exit 2, one line naming where.

LAUGHS = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else ', '.join(['lol'] * 9)}]\n"
                 for i in range(9))  # 9**9 values once expanded, from under 600 bytes


def refused(capsys, *argv: str) -> str:
    """pipeline.cli.main(argv) exits 2 with exactly one line on stderr, no traceback; returns it."""
    from pipeline.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 2, (code, captured.err)
    lines = refusal_lines(captured.err)
    assert len(lines) == 1 and lines[0].startswith("featurize: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def test_yaml_bomb_job_file_is_refused_before_anything(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(LAUGHS + "name: t\nsource: {uri: data/}\noutput: {uri: out/}\n")
    assert len(bomb.read_bytes()) < 1000
    line = refused(capsys, "run", str(bomb))
    assert str(bomb) in line and "expand" in line
    assert not (tmp_path / "out").exists()
    # the same guard on --set, and on a value that names itself
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(BASE))
    bomb_value = "{" + LAUGHS.replace("\n", ", ").rstrip(", ") + "}"
    assert "--set source.storage_options" in refused(capsys, "run", str(job_file), "--set", f"source.storage_options={bomb_value}")
    assert "--set model.arch" in refused(capsys, "run", str(job_file), "--set", "model.arch=&a [*a]")


def test_a_job_file_with_a_few_anchors_still_loads(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: t\n"
                    "source: {uri: 's3://a/', format: video_folder, storage_options: &s3 {anon: true, client_kwargs: {endpoint_url: 'http://x'}}}\n"
                    "output: {uri: 's3://b/', storage_options: {<<: *s3, anon: false}}\n"
                    "temporal: [&head {kind: mean, name: m1}, {<<: *head, name: m2}]\n")
    cfg = load_job(str(path))
    assert cfg.source.storage_options == {"anon": True, "client_kwargs": {"endpoint_url": "http://x"}}
    assert cfg.output.storage_options == {"anon": False, "client_kwargs": {"endpoint_url": "http://x"}}
    assert [t.name for t in cfg.temporal] == ["m1", "m2"]


@pytest.mark.parametrize("value, needle", [
    ("[", "not valid YAML"),
    ("{a: 1", "not valid YAML"),
    ("!!python/object/apply:os.system ['touch /tmp/featurize-pwned']", "not valid YAML"),
    ("!!python/name:os.system", "not valid YAML"),
])
def test_bad_set_values_are_refused_naming_the_key(tmp_path, capsys, value, needle):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(BASE))
    line = refused(capsys, "run", str(job_file), "--set", f"model.arch={value}")
    assert line.startswith("featurize: --set model.arch: ") and needle in line, line
    with pytest.raises(ConfigError, match=r"^--set model\.arch: not valid YAML"):
        parse_job(BASE, [f"model.arch={value}"])


def test_bad_yaml_job_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nsource: !!python/object:os.system {}\n")
    line = refused(capsys, "run", str(bad))
    assert str(bad) in line and "not valid YAML" in line


def test_garbage_weights_and_head_checkpoints_are_refused_before_any_work(tmp_path, capsys):
    """Random bytes named .safetensors (or .pth) are bad input, found on the driver by prepare:
    exit 2 naming the key, not "failed midway ... run again"."""
    import json
    import os

    junk = os.urandom(4096)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({**BASE, "output": {"uri": str(tmp_path / "out")},
                                        "model": {"arch": "resnet18"}, "preprocess": {"resize": 64, "crop": 56}}))
    for name in ("w.safetensors", "w.pth"):
        (tmp_path / name).write_bytes(junk)
        line = refused(capsys, "run", str(job_file), "--set", f"model.weights={tmp_path / name}")
        assert line.startswith(f"featurize: model.weights: {tmp_path / name} is not a ")
    (tmp_path / "head.safetensors").write_bytes(junk)
    (tmp_path / "head.json").write_text(json.dumps({"kind": "lstm", "input_size": 512, "hidden_size": 8}))
    video = ["--set", "source.format=video_folder", "--set", "model.weights=none",
             "--set", f"temporal=[{{kind: lstm, name: h, checkpoint: '{tmp_path / 'head.safetensors'}'}}]"]
    line = refused(capsys, "run", str(job_file), *video)
    assert line.startswith("featurize: temporal[0].checkpoint: ") and "safetensors" in line
    (tmp_path / "head.json").write_bytes(junk)  # its config, garbage too
    line = refused(capsys, "run", str(job_file), *video)
    assert line.startswith("featurize: temporal[0].checkpoint: ") and "head.json is not valid JSON" in line
    assert not (tmp_path / "out").exists()


def test_an_output_that_recorded_a_relative_source_path_still_resumes_from_its_folder(tmp_path, monkeypatch):
    """Local paths are made absolute when a job is loaded; an output made before recorded them as written."""
    from pipeline.config import absolute_local
    from pipeline.output.root import differences

    monkeypatch.chdir(tmp_path)
    assert absolute_local("data/images") == str(tmp_path / "data/images")
    assert absolute_local("s3://bucket/data") == "s3://bucket/data" and absolute_local("/abs") == "/abs"
    old = {"source.uri": "data/images", "model.arch": "resnet18"}
    assert differences(old, {"source.uri": str(tmp_path / "data/images"), "model.arch": "resnet18"}) == []
    assert differences(old, {"source.uri": "/elsewhere/data/images", "model.arch": "resnet18"}) == [
        'source.uri ("data/images" -> "/elsewhere/data/images")']


@pytest.mark.parametrize("source", [{"format": "image_folder"}, {"format": "manifest", "media": "image"}])
def test_temporal_heads_on_an_image_source_are_refused_naming_both_keys(source):
    data = {"name": "t", "source": {"uri": "imgs/", **source}, "output": {"uri": "out"},
            "temporal": [{"kind": "mean", "name": "mean"}]}
    with pytest.raises(ConfigError) as e:
        parse_job(data)
    key = "source.media: image" if "media" in source else "source.format: image_folder"
    assert str(e.value).startswith("temporal: heads over frames need videos") and key in str(e.value)
    parse_job({**data, "source": {"uri": "v/", "format": "video_folder"}})  # the same heads on videos: fine


CLIPS = {"name": "t", "source": {"uri": "v/", "format": "video_folder"}, "output": {"uri": "out"},
         "model": {"family": "torchvision_video", "arch": "r2plus1d_18"}}


def test_a_clip_model_job_needs_no_heads_and_reads_videos_whatever_the_source():
    cfg = parse_job(CLIPS)
    assert cfg.clips and cfg.is_video and not cfg.temporal and cfg.video.num_frames is None  # prepare resolves it
    shards = parse_job({**CLIPS, "source": {"uri": "s/", "format": "webdataset"}})
    assert shards.is_video  # a clip model reads videos from shards without source.media
    with pytest.raises(ConfigError, match=r"^temporal: a video job needs at least one head"):
        parse_job({**CLIPS, "model": {"arch": "resnet18"}})  # an image model's video job: as before


@pytest.mark.parametrize("change,message", [
    ({"temporal": [{"kind": "mean", "name": "mean"}]}, "temporal: heads pool per-frame features, but model.family "
                                                       "torchvision_video embeds each clip whole"),
    ({"output": {"uri": "out", "frame_features": True}}, "output.frame_features: model.family torchvision_video"),
    ({"video": {"sampling": "fps", "fps": 2}}, "video.sampling: model.family torchvision_video embeds each clip "
                                               "whole (one `feature` per window) from video.num_frames frames"),
    ({"source": {"uri": "i/"}}, "source.format: image_folder reads images, but model.family torchvision_video"),
    ({"source": {"uri": "m/", "format": "manifest", "media": "image"}}, "source.media: image reads images"),
    ({"video": {"num_frames": 0}}, "video.num_frames: must be at least 1, got 0"),
])
def test_what_a_clip_model_job_cannot_have_is_refused_naming_the_key(change, message):
    with pytest.raises(ConfigError) as e:
        parse_job({**CLIPS, **change})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_windows_in_frames_are_the_windows_in_seconds_with_frames_at_the_extraction_fps():
    """video_features' stack and step at an extraction fps: 8-frame clips at 15 fps every 4 frames."""
    from pipeline.extract.video import plan_windows

    cfg = parse_job({**CLIPS, "video": {"extraction_fps": 15, "stack_frames": 8, "step_frames": 4}})
    assert (cfg.video.window_s, cfg.video.stride_s, cfg.video.num_frames) == (8 / 15, 4 / 15, 8)
    windows = plan_windows(90, 30.0, cfg.video)  # a 3 s video at 30 fps: one frame in 2 is a 15 fps frame
    assert [list(w.frames) for w in windows[:2]] == [list(range(1, 16, 2)), list(range(9, 24, 2))]
    assert len(windows) == 10 and windows[-1].end_s == pytest.approx(44 / 15)  # the last whole stack: 36 + 8
    assert parse_job(to_dict(cfg)) == cfg  # the job read back from its record (both forms, agreeing)
    side_by_side = parse_job({**CLIPS, "video": {"extraction_fps": 25, "stack_frames": 16}}).video
    assert (side_by_side.window_s, side_by_side.stride_s) == (0.64, 0.64)


@pytest.mark.parametrize("video,message", [
    ({"stack_frames": 16}, "video.extraction_fps: required (and positive) with video.stack_frames"),
    ({"stack_frames": 16, "extraction_fps": 0}, "video.extraction_fps: required (and positive)"),
    ({"step_frames": 8}, "video.step_frames: needs video.stack_frames"),
    ({"step_frames": 8, "extraction_fps": 25}, "video.extraction_fps and video.step_frames: need video.stack_frames"),
    ({"extraction_fps": 25}, "video.extraction_fps: needs video.stack_frames"),
    ({"stack_frames": 0, "extraction_fps": 25}, "video.stack_frames: must be a whole number of frames, at least 1"),
    ({"stack_frames": 16, "step_frames": -2, "extraction_fps": 25}, "video.step_frames: must be a whole number"),
    ({"stack_frames": 16, "extraction_fps": 25, "window_s": 2.0}, "video.window_s: 2.0, but video.stack_frames 16 and "
                                                                  "step_frames 16 at extraction_fps 25 make it 0.64"),
    ({"stack_frames": 16, "extraction_fps": 25, "num_frames": 8}, "video.num_frames: 8, but video.stack_frames 16"),
    ({"stack_frames": 16, "extraction_fps": 25, "sampling": "all"}, "video.sampling: all, but video.stack_frames"),
])
def test_windows_in_frames_that_are_incomplete_or_disagree_are_refused_naming_the_key(video, message):
    with pytest.raises(ConfigError) as e:
        parse_job({**CLIPS, "video": video})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["../../x", "/abs", ".hidden", "a/b", "x" * 129, "", "a..b"])
def test_a_temporal_head_name_that_is_not_plain_is_refused_naming_the_key(name):
    """The name becomes the column clip_<name>, which later commands turn into paths (OUT/_index/...)."""
    data = {"name": "t", "source": {"uri": "v/", "format": "video_folder"}, "output": {"uri": "out"},
            "temporal": [{"kind": "mean", "name": "mean"}, {"kind": "max", "name": name}]}
    with pytest.raises(Refused) as e:
        parse_job(data)
    message = str(e.value)
    assert message.startswith("temporal[1].name: ") and "is not a plain name" in message and "\n" not in message
