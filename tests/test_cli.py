"""The `featurize` command line, run as a user runs it: a separate process per call.

A job that cannot run exits 2 with one line naming the key or path, before any Ray starts. Each
process gets its own RAY_TMPDIR, so whether it started Ray is visible as `RAY_TMPDIR/ray`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipeline.samples import make_image_folder

from conftest import SMALL_MODEL, SMALL_PREPROCESS, job_dict, refusal_lines, tree

FEATURIZE = Path(sys.executable).with_name("featurize")


def featurize(*args: str, env_extra=None, cwd=None, timeout=180) -> subprocess.CompletedProcess:
    command = [str(FEATURIZE)] if FEATURIZE.exists() else [sys.executable, "-m", "pipeline.cli"]
    env = {**os.environ, **(env_extra or {})}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


SEP = "=== featurize exited "
COMMANDS = f"""import json, sys
from pipeline.cli import main
for argv in json.loads(sys.argv[1]):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    print({SEP!r} + str(code), flush=True)
    print({SEP!r}, file=sys.stderr, flush=True)
"""


def featurize_each(*commands, env_extra=None, timeout=180):
    """Each command (the arguments of `featurize`) through the command's main() in turn, in one new
    process: a list of (returncode, stdout, stderr), one per command, as separate runs would give."""
    env = {**os.environ, **(env_extra or {})}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", COMMANDS, json.dumps(commands)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs, errs = proc.stdout.split(SEP), proc.stderr.split(SEP + "\n")
    assert len(outs) == len(errs) == len(commands) + 1, (proc.stdout[-2000:], proc.stderr[-2000:])
    codes = [int(out.split("\n", 1)[0]) for out in outs[1:]]
    stdouts = [outs[0]] + [out.split("\n", 1)[1] for out in outs[1:-1]]
    return [SimpleNamespace(returncode=c, stdout=o, stderr=e) for c, o, e in zip(codes, stdouts, errs)]


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    make_image_folder(str(root), n=6, broken=2)
    return root


def write_job(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def assert_refused(result: subprocess.CompletedProcess, ray_tmpdir: Path, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = refusal_lines(result.stderr)
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("featurize: ")
    for needle in needles:
        assert needle in line, line
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not (ray_tmpdir / "ray").exists(), "a refused job started Ray"
    return line


@pytest.mark.timeout(60)
def test_unknown_key_is_refused_fast_without_ray_or_torch(tmp_path, images, ray_tmpdir):
    data = job_dict(str(images), str(tmp_path / "out"))
    data["model"]["pooling"] = "avg"
    job = write_job(tmp_path / "bad.yaml", data)
    # Config validation needs neither Ray nor torch: poison both imports to prove they never load.
    poison = tmp_path / "poison"
    for module in ("ray", "torch"):
        (poison / module).mkdir(parents=True)
        (poison / module / "__init__.py").write_text(f"raise ImportError('{module} imported to check a job file')\n")
    result = featurize("run", str(job), env_extra={"RAY_TMPDIR": str(ray_tmpdir), "PYTHONPATH": str(poison)})
    line = assert_refused(result, ray_tmpdir, "model.pooling")
    assert "unknown key" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(90)
def test_unknown_arch_and_missing_source_are_refused(tmp_path, images, ray_tmpdir):
    job = write_job(tmp_path / "job.yaml", job_dict(str(images), str(tmp_path / "out")))
    missing = tmp_path / "no-such-folder"
    import torch
    import torchvision

    weights = tmp_path / "resnet18.pth"  # weights of another architecture than the job's
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    # the three runs in one new process, one after another (one torch import, not three)
    arch, source, fit = featurize_each(
        ["run", str(job), "--set", "model.arch=resnet1800"],
        ["run", str(job), "--set", f"source.uri={missing}"],
        ["run", str(job), "--set", "model.arch=resnet50", "--set", f"model.weights={weights}"],
        env_extra={"RAY_TMPDIR": str(ray_tmpdir)})

    assert_refused(arch, ray_tmpdir, "model.arch", "resnet1800")
    assert_refused(source, ray_tmpdir, "source.uri", str(missing))
    assert_refused(fit, ray_tmpdir, "model.weights", "does not fit resnet50")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_run_then_inspect(tmp_path, images, ray_tmpdir, ray_session, capsys):
    out = tmp_path / "out"
    data = {
        "name": "cli-small",
        "source": {"uri": str(images), "format": "image_folder", "split": "demo"},
        "preprocess": dict(SMALL_PREPROCESS),
        "model": dict(SMALL_MODEL),
        "output": {"uri": str(out)},
        "resources": {"batch_size": 8, "decode_batch_size": 4},
    }
    job = write_job(tmp_path / "job.yaml", data)

    # it joins the session's Ray (no Ray start of its own); test_progress's first run starts one,
    # and checks that it shows in RAY_TMPDIR as a refusal's checks above expect
    address = ray_session.get_runtime_context().gcs_address
    result = featurize("run", str(job), "--set", "resources.batch_size=4", "--address", address,
                       env_extra={"RAY_TMPDIR": str(ray_tmpdir)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "samples      8 (6 features, 2 errors)" in lines
    assert any(line.startswith("throughput") and "samples/s" in line for line in lines)
    assert f"output       {out}" in lines
    assert "model        resnet18 (torchvision)" in lines and "weights      random-init(seed=0)" in lines
    assert any(line.startswith("WARNING      random weights: resnet18") for line in lines)  # model.weights: none
    error_lines = [line.split() for line in lines if line.strip().startswith("error ")]
    assert sum(int(parts[1]) for parts in error_lines) == 2
    assert all(parts[2].startswith("decode/") for parts in error_lines)
    assert ["error", "1", "decode/DecodeError"] in error_lines  # the zero-byte file

    record = json.loads((out / "_job.json").read_text())
    assert record["status"] == "complete"
    assert record["config"]["resources"]["batch_size"] == 4  # the --set override was applied
    assert record["counts"]["features"] == 6 and record["counts"]["errors"] == 2

    # another job into the same output is refused, naming what differs, and changes nothing (here
    # through main(): a refusal in a new process is above)
    from pipeline.cli import main

    before = tree(out)
    capsys.readouterr()
    assert main(["run", str(job), "--set", "model.pool=max"]) == 2
    (line,) = refusal_lines(capsys.readouterr().err)
    assert 'model.pool ("avg" -> "max")' in line and "--overwrite" in line
    assert tree(out) == before

    # inspect, status, and the same job again, in one new process, one after another
    before = tree(out / "features")
    inspect, status, again = featurize_each(["inspect", str(out)], ["status", str(out)],
                                            ["run", str(job), "--set", "resources.batch_size=4"], timeout=120)
    assert inspect.returncode == 0, inspect.stderr
    text = inspect.stdout.splitlines()
    assert "job        cli-small (complete), planned 8" in text
    assert "rows       6" in text
    assert any(line.split() == ["split=demo", "6"] for line in text)
    assert "feature    feature: dim 512, halffloat" in text
    assert "errors     2" in text
    assert "  model: resnet18" in text and "  dim: 512" in text
    kinds = [line.split() for line in text if line.startswith("  decode/")]
    assert sum(int(parts[-1]) for parts in kinds) == 2

    assert status.returncode == 0, status.stderr
    assert "planned    8" in status.stdout and "remaining  0 planned samples not yet committed" in status.stdout
    assert "complete   yes" in status.stdout

    # the same job again finds everything done: it skips all, starts no Ray, changes no file
    assert again.returncode == 0, again.stderr
    assert "skipped      8 planned samples already committed" in again.stdout
    assert tree(out / "features") == before


def test_demo_never_removes_or_adds_to_what_it_did_not_create(tmp_path, capsys):
    """`featurize demo --job X` used to rmtree X's output.uri: a user's output was replaced by demo data."""
    from pipeline.cli import main
    from pipeline.demo import MARK, claim

    theirs = tmp_path / "their-output"
    (theirs / "features").mkdir(parents=True)
    (theirs / "features" / "part-1.parquet").write_bytes(b"their data")
    job = write_job(tmp_path / "job.yaml", {"name": "theirs", "source": {"uri": str(tmp_path / "data")},
                                            "output": {"uri": str(theirs)}})
    before = tree(tmp_path)
    code = main(["demo", "--job", str(job), "--data", str(tmp_path / "data"), "--video-job", ""])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds files the demo did not create" in err[0] and str(theirs) in err[0]
    assert tree(tmp_path) == before  # nothing removed, and no sample data written either

    data = tmp_path / "their-images"  # a data folder of someone else's is refused the same way
    data.mkdir()
    (data / "cat.jpg").write_bytes(b"x")
    assert main(["demo", "--data", str(data), "--video-job", ""]) == 2
    assert [p.name for p in data.iterdir()] == ["cat.jpg"]

    ours = tmp_path / "demo-out"  # the demo's own earlier output is replaced
    claim(str(ours), "output.uri")
    (ours / "features").mkdir()
    (ours / "features" / "old.parquet").write_bytes(b"old demo output")
    claim(str(ours), "output.uri", clear=True)
    assert sorted(p.name for p in ours.iterdir()) == [MARK]


def _refusal(capsys, argv) -> str:
    """main(argv) refused: exit 2 and one line on stderr, which is returned."""
    from pipeline.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("featurize: "), err
    return err[0]


def test_files_that_are_not_yaml_mappings_get_one_line(tmp_path, capsys):
    jpeg = tmp_path / "cat.jpg"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)))
    toml = tmp_path / "job.toml"
    toml.write_text('name = "x"\noutput = "out"\n')  # TOML that happens to parse as one YAML string
    listed = tmp_path / "train.yaml"
    listed.write_text("- data\n- head\n")
    assert "cat.jpg: not a text file; a job file is YAML" in _refusal(capsys, ["run", str(jpeg)])
    assert "found TOML, which is not read" in _refusal(capsys, ["run", str(toml)])
    assert "training file" in _refusal(capsys, ["train", str(listed)])
    assert "expected a YAML mapping (data:, head:, output: ...), found a YAML list" in _refusal(
        capsys, ["train", str(listed)])
    assert "no output there" in _refusal(capsys, ["inspect", str(tmp_path / "no-such-output")])


def test_submit_takes_its_address_from_the_environment_when_not_given(tmp_path, capsys, monkeypatch):
    from pipeline.cli import main

    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(SystemExit):
        main(["submit", "--help"])
    assert "[--address ADDRESS]" in capsys.readouterr().out  # optional, whatever the environment holds
    job = write_job(tmp_path / "job.yaml", job_dict(str(tmp_path), str(tmp_path / "out")))
    assert "RAY_API_SERVER_ADDRESS" in _refusal(capsys, ["submit", str(job)])


def test_every_option_of_every_command_says_what_it_is(capsys):
    from pipeline.cli import _parser

    commands = next(a for a in _parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for name, parser in commands.items():
        for action in parser._actions:
            assert action.help, f"featurize {name} {action.option_strings or action.dest}: no help text"


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("ray_session")
def test_demo_runs_outside_the_checkout(tmp_path, monkeypatch, capsys):
    """The demo's jobs ship with the package: no jobs/ folder is needed where it runs."""
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--images", "8", "--video-job", ""]) == 0
    out = capsys.readouterr().out
    assert "8 images in 5 classes, 4 broken files" in out and "(8 features, 4 errors)" in out
    assert (tmp_path / "out" / "demo" / "_job.json").exists() and (tmp_path / "demo-data" / "images").is_dir()
    assert f"report       {tmp_path / 'out' / 'demo' / '_report.html'}" in out  # the image demo's report
    assert (tmp_path / "out" / "demo" / "_report.html").read_text().count("data:image/png") == 4


@pytest.mark.parametrize("command", [["status", "X"], ["inspect", "X"], ["report", "X"], ["index", "X"],
                                     ["search", "X", "--id", "a"], ["dedup", "X"],
                                     ["apply", "C", "--input", "X", "--output", "Y"], ["eval", "C", "--input", "X"]])
@pytest.mark.parametrize("value, says", [("{nope", "not JSON"), ("[1]", "a JSON object is needed")])
def test_storage_options_are_one_argparse_type_refused_in_one_line(command, value, says, capsys):
    from pipeline.cli import main

    assert main([*command, "--storage-options", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("featurize: --storage-options: ") and says in err[0], err


def test_status_and_inspect_of_no_output_are_refusals(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.errors import NoOutput, Refused
    from pipeline.output.status import status

    for command in ("status", "inspect"):
        assert main([command, str(tmp_path / "typo")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "typo: no output there" in err[0], err
    with pytest.raises(Refused):
        status(str(tmp_path / "typo"))
    assert issubclass(NoOutput, FileNotFoundError)  # callers that caught FileNotFoundError still do
