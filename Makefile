# Quick start: `make demo`, `make test`. Both create .venv and install into it first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

# One resolver pass for everything (separate installs let moto move botocore out of s3fs's range).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/featurize demo

# --durations: every run (CI's too) records its slowest tests. Markers only choose: -m "not cluster and not slow".
# -n 2: two workers, a test file at a time, the files that start Ray first (tests/conftest.py): on the
# 2-core machine the suite is CPU-bound in short-lived Ray processes, and one worker left a core idle
# a third of the time.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q --durations=25 -n 2 --dist loadfile --no-loadscope-reorder

bench: $(STAMP)
	$(BIN)/python bench/peers.py

clean:
	rm -rf $(VENV) out demo-data .pytest_cache
