"""The README's reading recipes run as written: every code block between its `recipes` marks,
on an output at out/demo in a `featurize run` output's layout (float16 features, D = 512)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

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
