"""bench/gpu.py, the GPU check, runs on the CPU (small) so that it cannot rot between GPU runs."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEASURED_ON_CPU = ("model_alone", "actor_cpu_decode_t1", "actor_cpu_decode_t2", "model_alone_r2plus1d_18",
                   "model_alone_s3d")
GPU_ONLY = ("decode_jpeg_alone", "device_decode_alone", "actor_gpu_decode", "actor_gpu_decode_cudnn_benchmark",
            "actor_two_in_flight", "model_alone_compiled", "actor_gpu_decode_compiled")


def test_gpu_bench_runs_on_cpu_without_ray(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--device", "cpu", "--quick",
                           "--threads", "1,2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["ray_imported"] is False  # the path it measures runs where Ray is not installed
    rows = {r["key"]: r for r in result["rows"]}
    for key in MEASURED_ON_CPU:
        assert rows[key]["status"] == "ok" and rows[key]["images_per_s"] > 0, rows[key]
    for key in GPU_ONLY:
        assert rows[key]["status"] == "skipped" and rows[key]["images_per_s"] is None, rows[key]
    assert rows["model_alone_convnext_tiny"]["status"] in ("ok", "skipped")  # timm may be absent
    for key, clip in (("model_alone_r2plus1d_18", "1x4x32"), ("model_alone_s3d", "1x16x224")):  # the smallest
        assert rows[key]["clip"] == clip and rows[key]["clips_per_s"] > 0, rows[key]
    for check in ("decode_cosine", "bf16_cosine"):  # the same comparisons a GPU run makes, on the CPU
        c = result["checks"][check]
        assert c["rows"] == 16 and c["min"] >= 0.99 and c["pass"], c
    assert result["checks"]["decode_cosine"]["device_decode_on"] == "cpu"
    assert set(result["targets"]) == {"actor_over_model", "actor_images_per_s"}
    assert result["settings"]["arch"] == "resnet18" and result["settings"]["batch"] == 4
    md = (tmp_path / "gpu.md").read_text()
    assert "CPU (smoke run, not a GPU figure)" in md and "| actor_cpu_decode_t1 |" in md and "| model_alone_s3d |" in md
    assert "| model_alone |" in proc.stdout  # the table is printed too
