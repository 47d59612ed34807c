"""The README's blocks run as written: every code block between its `recipes` marks, on an output
at out/demo in a `featurize run` output's layout (float16 features, D = 512); the video job, its
split lists and the training file through the real parsers and planner; the key tables against the
config dataclasses' keys and defaults."""
from __future__ import annotations

import dataclasses
import itertools
import re
import typing
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest
import yaml

from tables import write_table

README = Path(__file__).resolve().parent.parent / "README.md"
N, D = 6, 512


def recipes():
    text = README.read_text()
    section = text[text.index("<!-- recipes"):text.index("<!-- /recipes -->")]
    return re.findall(r"```(python|sql)\n(.*?)```", section, re.S)


@pytest.fixture
def demo_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x = np.random.default_rng(0).normal(size=(N, D))
    write_table("out/demo", ["demo"] * N, ["007", "cat", "true"] * 2, feature=x)  # labels a reader could type
    return x.astype(np.float16).astype(np.float32)


def test_the_readme_has_the_five_readers_and_the_api():
    code = "\n".join(body for _, body in recipes())
    for reader in ("featurize.open", "pyarrow.dataset", "pd.read_parquet", "pl.read_parquet",
                   "ray.data.read_parquet", "array_cosine_similarity"):
        assert reader in code, reader


def rows(x) -> list:
    """The rows of a (N, D) matrix as float32 tuples, in a fixed order: readers differ in row order."""
    x = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
    return sorted(map(tuple, x.astype(np.float32)))


@pytest.mark.usefixtures("ray_session")
def test_every_recipe_runs_as_written_and_gives_the_features(demo_output):
    import duckdb

    blocks = recipes()
    assert [lang for lang, _ in blocks] == ["python"] * 5 + ["sql"]
    api, *readers, (_, sql) = blocks
    scope: dict = {}
    exec(compile(api[1], str(README), "exec"), scope)  # noqa: S102 - the README's own code
    order = np.argsort(scope["ids"])
    assert scope["x"].dtype == np.float32 and np.array_equal(scope["x"][order], demo_output)
    assert sorted(scope["labels"]) == ["007", "007", "cat", "cat", "true", "true"]
    assert np.array_equal(scope["xt"].numpy(), scope["x"])
    assert np.array_equal(np.stack(scope["df"]["feature"]), scope["x"]) and list(scope["df"]["label"]) == list(
        scope["labels"])
    assert scope["pf"].schema["feature"].shape == (D,) and np.array_equal(scope["pf"]["feature"].to_numpy(), scope["x"])
    assert scope["errors"].num_rows == 0

    for _, body in readers:  # pyarrow, pandas, Polars, Ray Data: each leaves its (N, D) matrix in x
        if "import ray" in body:  # Ray's workers list files from the folder the session's Ray started in
            body = body.replace('"out/demo', f'"{Path.cwd()}/out/demo')
        scope = {}
        exec(compile(body, str(README), "exec"), scope)  # noqa: S102
        assert rows(scope["x"]) == rows(demo_output), body.splitlines()[0]

    statements = [s for s in sql.split(";") if s.strip()]
    counts, similar = (duckdb.sql(s).fetchall() for s in statements)
    assert sorted(counts) == [("demo", "007", 2), ("demo", "cat", 2), ("demo", "true", 2)]  # exact labels
    assert len(similar) == 5 and similar[0][0] == "s00000" and similar[0][2] == pytest.approx(1.0, abs=1e-5)
    assert all(-1 <= s < 1 - 1e-3 for _, _, s in similar[1:])


# ------------------------------------------------ the video job, split list and training file sections

REQUIRED = "required"


def block(name: str) -> str:
    """The fenced block right after `<!-- test_readme: NAME -->`."""
    found = re.search(rf"<!-- test_readme: {re.escape(name)} -->\n```\w*\n(.*?)```", README.read_text(), re.S)
    assert found, f"README has no block marked {name!r}"
    return found.group(1)


def key_table(name: str) -> Dict[str, Any]:
    """key -> default of the table right after `<!-- test_readme: NAME -->`: `required`, or the
    default cell's YAML read as a job file reads it."""
    text = README.read_text()
    lines = text[text.index(f"<!-- test_readme: {name} -->"):].splitlines()[1:]
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines))
    keys = {}
    for line in table[2:]:
        key, default = (cell.strip() for cell in line.strip("|").split("|")[:2])
        assert re.fullmatch(r"`[\w.\[\]]+`", key) and key not in keys, line
        keys[key.strip("`")] = REQUIRED if default == REQUIRED else yaml.safe_load(default.strip("`"))
    return keys


def code_defaults(cls, prefix: str = "") -> Dict[str, Any]:
    """Every key of a config dataclass with its default (`required` without one), nested sections
    as `a.b` and list entries as `a[].b`: what the parser takes."""
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(tp):
            out.update(code_defaults(tp, f"{key}."))
        elif dataclasses.is_dataclass(item):
            out.update(code_defaults(item, f"{key}[]."))
        elif f.default is not dataclasses.MISSING:
            out[key] = f.default
        else:
            out[key] = f.default_factory() if f.default_factory is not dataclasses.MISSING else REQUIRED
    return out


def test_the_video_keys_table_names_every_video_and_temporal_key_with_the_code_s_default():
    from pipeline.config import JobConfig

    table, code = key_table("video keys"), code_defaults(JobConfig)
    assert {k: code.get(k, "not a key") for k in table} == table
    assert {k for k in code if k.startswith(("video.", "temporal[]."))} <= set(table)


def test_the_training_keys_table_names_every_key_with_the_code_s_default():
    from pipeline.train.trainfile import TrainConfig

    assert key_table("training keys") == code_defaults(TrainConfig)


def test_the_video_job_parses_and_its_split_lists_give_the_splits_the_readme_says(tmp_path, monkeypatch):
    from pipeline.config import load_job
    from pipeline.extract.plan import plan_source, split_list_gaps
    from pipeline.extract.video import plan_windows

    monkeypatch.chdir(tmp_path)
    Path("job.yaml").write_text(block("video job"))
    job = load_job("job.yaml")
    assert job.is_video and [t.name for t in job.temporal] == ["mean", "max"]
    said = " ".join(README.read_text().split())  # the windows the README says this job cuts a 10 s video into
    assert ("a 10 s video with `window_s: 4.0, stride_s: 2.0` gives windows at 0-4, 2-6, 4-8 and 6-10 s" in said
            and "`...avi#4`, or `#4.0`: `...avi#w2` here" in said)
    windows = plan_windows(250, 25.0, job.video)  # 10 s at 25 fps
    assert [(w.index, w.start_s, w.end_s) for w in windows] == [(0, 0, 4), (1, 2, 6), (2, 4, 8), (3, 6, 10)]
    lists = {split: block(Path(path).name) for split, path in job.source.split_files.items()}
    assert sorted(lists) == ["test", "train"]
    for split, path in job.source.split_files.items():  # UCF101's lists where the job names them
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(lists[split])
    listed = {line.split()[0]: split for split, text in lists.items() for line in text.splitlines()}
    assert any(len(line.split()) == 2 for line in lists["train"].splitlines())  # trainlist: path, class number
    assert all(len(line.split()) == 1 for line in lists["test"].splitlines())  # testlist: the path alone
    videos = [*listed, "Archery/v_Archery_g25_c07.avi"]  # and one video in no list
    for video in videos:
        Path(job.source.uri, video).parent.mkdir(parents=True, exist_ok=True)
        Path(job.source.uri, video).write_bytes(b"a video: not decoded by the listing")
    plan = plan_source(job.source)
    rows = plan.to_pylist()
    assert {r["sample_id"]: r["split"] for r in rows} == {**listed, "Archery/v_Archery_g25_c07.avi": "unlisted"}
    assert {r["label"] for r in rows} == {"ApplyEyeMakeup", "Archery"}  # the folder's name, not the class number
    assert split_list_gaps(plan) == {"unlisted": 1, "missing": 0, "first_missing": []}


def test_the_training_file_parses_and_trains_on_the_video_job_s_frames(tmp_path):
    from pipeline.config import parse_job
    from pipeline.train.trainfile import load_training

    path = tmp_path / "train.yaml"
    path.write_text(block("training file"))
    cfg = load_training(str(path))
    assert (cfg.head.kind, cfg.data.column, cfg.data.train_split) == ("lstm", "frame_features", "train")
    job = parse_job(yaml.safe_load(block("video job")))
    assert cfg.data.uri == job.output.uri and job.output.frame_features
