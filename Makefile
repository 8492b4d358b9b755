# `make train` and `make test` set up .venv on first use (scripts/setup.sh), then run.
# PYTHONSAFEPATH keeps the checkout root off sys.path, so only the installed package is seen.
VENV := .venv
ARGS ?=
PYTEST_ARGS ?=
NPROC ?= 2
export PYTHONSAFEPATH := 1
export HF_HUB_OFFLINE := 1

.PHONY: setup train test bench clean

setup:
	@bash scripts/setup.sh

train: setup
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m visioncoach.train $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# A script's own folder on sys.path (not the checkout root) is what lets it import bench/_common.py.
bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; PYTHONSAFEPATH= $(VENV)/bin/python $$b || exit 1; done

clean:
	rm -rf build *.egg-info visioncoach/*.so .pytest_cache
