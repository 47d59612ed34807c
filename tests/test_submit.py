"""What `featurize submit` sends, without a cluster: the job as shipped, and the layout line."""

from pipeline.config import parse_job
from pipeline.output.record import format_layout
from pipeline.submit import is_loopback, local_paths, shipped_job

JOB = {"name": "t", "source": {"uri": "data/videos", "format": "video_folder", "split_files": {"train": "lists/train.txt"}},
       "output": {"uri": "out/t"}, "model": {"arch": "resnet18", "weights": "IMAGENET1K_V1"},
       "temporal": [{"kind": "lstm", "name": "lstm", "checkpoint": "heads/lstm.safetensors"}]}


def test_relative_local_paths_become_absolute_and_overrides_are_applied(tmp_path):
    (tmp_path / "heads").mkdir()
    (tmp_path / "heads" / "lstm.safetensors").write_bytes(b"x")
    data = shipped_job(JOB, ["resources.batch_size=64"], str(tmp_path))
    assert data["source"]["uri"] == str(tmp_path / "data/videos")
    assert data["output"]["uri"] == str(tmp_path / "out/t")
    assert data["source"]["split_files"]["train"] == str(tmp_path / "lists/train.txt")
    assert data["temporal"][0]["checkpoint"] == str(tmp_path / "heads/lstm.safetensors")
    assert data["model"]["weights"] == "IMAGENET1K_V1"  # a torchvision weights name, not a path
    assert data["resources"]["batch_size"] == 64
    assert JOB["source"]["uri"] == "data/videos"  # the caller's mapping is left alone
    parse_job(data)  # still a valid job


def test_uris_absolute_paths_and_weight_names_are_kept(tmp_path):
    job = {**JOB, "source": {"uri": "s3://bucket/images/"}, "output": {"uri": "/data/out"},
           "model": {"arch": "resnet18", "weights": "none"}, "temporal": []}
    data = shipped_job(job, [], str(tmp_path))
    assert (data["source"]["uri"], data["output"]["uri"], data["model"]["weights"]) == \
        ("s3://bucket/images/", "/data/out", "none")


def test_local_paths_are_named_for_the_remote_cluster_warning(tmp_path):
    job = parse_job(shipped_job({**JOB, "output": {"uri": "s3://b/out"}}, [], str(tmp_path)))
    assert local_paths(job) == [str(tmp_path / "data/videos"), str(tmp_path / "heads/lstm.safetensors")]
    assert is_loopback("http://127.0.0.1:8265") and is_loopback("localhost:8265")
    assert not is_loopback("http://10.0.0.5:8265") and not is_loopback("https://ray.example.com")


def test_the_layout_line_says_where_each_stage_runs():
    gpu = {"actors": 1, "max_actors": 8, "gpus_per_actor": 1.0, "torch_threads": 2, "batch_size": 256,
           "decode_on": "CPU-only nodes (3 of 11)", "cpus": 300.0}
    assert format_layout(gpu) == ("1 to 8 model actors, 1 GPU each, batch 256; "
                                  "decode on CPU-only nodes (3 of 11); 300 CPUs in the cluster")
    cpu = {**gpu, "max_actors": 1, "gpus_per_actor": 0.0, "batch_size": 32, "decode_on": "any node", "cpus": 2.0}
    assert format_layout(cpu) == ("1 model actor, on CPU with 2 torch threads, batch 32; "
                                  "decode on any node; 2 CPUs in the cluster")
    in_actor = {**cpu, "decode_on": "the model actor", "decode_in_actor": True}
    assert format_layout(in_actor) == ("1 model actor, on CPU with 2 torch threads, batch 32; "
                                       "decode in the model actor; 2 CPUs in the cluster")


def test_the_submitted_command_carries_overwrite(monkeypatch, capsys):
    """`featurize submit --overwrite`: the cluster runs the job (or training) with --overwrite, which
    a training left failed or a rebuilt table needs (their refusals suggest it)."""
    import ray.job_submission

    from pipeline import submit as submit_module

    sent = []

    class Client:
        def __init__(self, address):
            pass

        def submit_job(self, **kwargs):
            sent.append(kwargs["entrypoint"])
            return kwargs["submission_id"]

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Client)
    job = parse_job({"name": "t", "source": {"uri": "s3://b/images"}, "output": {"uri": "s3://b/o"}})
    for overwrite in (False, True):
        assert submit_module.submit(job, {}, "http://127.0.0.1:8265", wait=False, overwrite=overwrite) == 0
    assert sent[0].endswith("run job.yaml --address auto") and sent[1].endswith("--address auto --overwrite")
    assert "submitted" in capsys.readouterr().out
