"""--incremental: a growing dataset's new samples are planned and processed, each exactly once."""
from __future__ import annotations

import json

import pytest

from pipeline.errors import OutputExists
from pipeline.output.root import JOB_FILE
from pipeline.output.status import status
from pipeline.samples import encode, make_image_folder, photo

from conftest import assert_exactly_once, assert_whole_files, job_dict, planned, run, tree

pytestmark = pytest.mark.usefixtures("ray_session")


def _add_images(folder, names, seed=50):
    for k, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(encode(photo(70 + k, 60, seed=seed + k)))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_incremental_run_takes_up_only_what_the_source_gained_and_reports_what_is_gone(tmp_path, faults):
    src, out = tmp_path / "images", tmp_path / "out"
    make_image_folder(str(src), n=10, broken=1)
    job = job_dict(str(src), str(out))
    run(job)
    first = planned(src)

    new = ["n01440764/new_0.jpg", "n01440764/new_1.jpg", "late/new_2.jpg"]
    _add_images(src, new)
    gone = sorted(first)[:2]  # one committed feature row and one more; deleted from the source
    for sid in gone:
        (src / sid).unlink()
    assert run(job).samples == 0  # a plain run keeps to its plan: nothing new is taken up
    before = tree(out / "features")

    faults("write", action="raise", after=1)  # the incremental run fails midway ...
    with pytest.raises(Exception, match="fault injected"):
        run(job, incremental=True)
    # ... having saved the grown plan: a plain rerun finishes it
    summary = run(job)
    assert summary.samples + summary.skipped == len(first) + len(new)
    features = assert_exactly_once(str(out), first + new)[0]
    assert set(new) <= set(features)
    assert all(tree(out / "features").get(rel) == v for rel, v in before.items())  # old files untouched
    assert_whole_files(str(out))
    assert status(str(out))["complete"]

    summary = run(job, incremental=True)  # listed again: nothing new; the deleted files stay gone ...
    assert (summary.added, summary.gone, summary.samples) == (0, len(gone), 0)
    assert_exactly_once(str(out), first + new)  # ... and keep their rows

    # one more added and one more gone: the run reports both, and only the new one is done
    _add_images(src, ["n02102040/extra.jpg"], seed=80)
    (src / new[0]).unlink()
    summary = run(job, incremental=True)
    assert (summary.added, summary.gone, summary.features) == (1, len(gone) + 1, 1)
    record = json.loads((out / JOB_FILE).read_text())
    assert record["runs"][-1]["added_to_plan"] == 1 and record["runs"][-1]["gone_from_source"] == len(gone) + 1
    planned_now = first + new + ["n02102040/extra.jpg"]
    assert record["counts"]["planned"] == len(planned_now)  # the gone samples stay planned, and their rows stay
    features, errors = assert_exactly_once(str(out), planned_now)
    assert len(errors) == 1 and new[0] in features and "n02102040/extra.jpg" in features

    with pytest.raises(OutputExists, match="choose one"):
        run(job, incremental=True, overwrite=True)


def test_extend_plan_joins_the_new_listing_out_of_core(tmp_path):
    """extend_plan without a run: new samples join the saved plan in order, a deleted one stays
    planned and counts as gone, and listing again adds nothing."""
    from fsspec.implementations.local import LocalFileSystem

    from pipeline.config import SourceConfig
    from pipeline.extract.plan import write_plan
    from pipeline.extract.planfile import scratch
    from pipeline.output.root import extend_plan, load_plan, local_plan, save_plan

    src, out = tmp_path / "src", str(tmp_path / "out")
    for name in ("1", "2", "3"):
        _add_images(src, [f"a/{name}.jpg"])
    fs, cfg = LocalFileSystem(), SourceConfig(uri=str(src))
    with scratch() as folder:
        save_plan(fs, out, write_plan(cfg, folder))
    (src / "a" / "1.jpg").unlink()
    _add_images(src, ["a/0.jpg", "b/9.jpg"])
    with scratch() as folder:
        plan, added, gone = extend_plan(fs, out, local_plan(fs, out, folder), cfg, folder)
        ids = plan["sample_id"].to_pylist()
    assert (added, gone) == (2, 1) and ids == ["a/0.jpg", "a/1.jpg", "a/2.jpg", "a/3.jpg", "b/9.jpg"]
    assert load_plan(fs, out)["sample_id"].to_pylist() == ids
    assert "fetch_uri" not in load_plan(fs, out).column_names  # OUT's copy never holds the real URIs
    with scratch() as folder:
        assert extend_plan(fs, out, local_plan(fs, out, folder), cfg, folder)[1:] == (0, 1)
