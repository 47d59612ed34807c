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
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q --durations=25

bench: $(STAMP)
	$(BIN)/python bench/peers.py

clean:
	rm -rf $(VENV) out demo-data .pytest_cache
