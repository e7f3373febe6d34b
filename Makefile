# make bench : set up .venv/ if needed, then run the fused-loss benchmark on this machine
# make test  : set up .venv/ if needed, then lint and run the test suite
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: bench test lint setup

$(STAMP): pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh
	touch $(STAMP)

setup: $(STAMP)

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_head_loss.py --out "benchmarks/results/head_loss_{device}.json"

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(VENV)/bin/python -m pytest -q tests
