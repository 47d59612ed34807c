"""Every bench/ script still imports: they run by hand, rarely, so a renamed class would otherwise
break them unseen (bench/images.py imported a removed CnnEmbedder alias for a while)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_bench_script_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # as when run: a script's folder is first on sys.path
    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", BENCH / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # top-level imports only: each runs its work under __main__
    if "__main__" in (BENCH / script).read_text():  # a script; a helper the scripts import (quality_tasks) has none
        assert callable(getattr(module, "main", None)), f"bench/{script} has no main()"
