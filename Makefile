# `make train` and `make test` set up .venv on first use (scripts/setup.sh), then run.
# PYTHONSAFEPATH keeps the checkout root off sys.path, so only the installed package is seen.
VENV := .venv
ARGS ?=
PYTEST_ARGS ?=
NPROC ?= 2
export PYTHONSAFEPATH := 1
export HF_HUB_OFFLINE := 1

GPU_CHECK_OUT ?= runs/gpu_check

.PHONY: setup train test bench microbench learn gpu-check clean

setup:
	@bash scripts/setup.sh

train: setup
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m visioncoach.train $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# A script's own folder on sys.path (not the checkout root) is what lets it import bench/_common.py.
# The learning benchmark (40 minutes of training) has its own target.
bench: setup
	@for b in $$(ls bench/bench_*.py | grep -v bench_learning); do echo "== $$b"; PYTHONSAFEPATH= $(VENV)/bin/python $$b || exit 1; done

# Evidence that it learns (bench/bench_learning.py): alignment + SFT, then plain GSPO and GSPO + VP + SD
# from the same checkpoint, 3 seeds; ARGS="--arms gspo --seeds 0" runs one arm for one seed.
learn: setup
	PYTHONSAFEPATH= $(VENV)/bin/python bench/bench_learning.py $(ARGS)

# The kernel and pipeline microbenchmarks through pytest-benchmark (bench/conftest.py), each
# beside its baseline; PYTEST_ARGS="--benchmark-save=NAME" / "--benchmark-compare=NNNN" track them.
microbench: setup
	$(VENV)/bin/python -m pytest bench/ --benchmark-only $(PYTEST_ARGS)

# The GPU check kit (README "GPU work"): at most 8 minutes on one GPU; without one, the
# CPU-safe parts only (exit 0). Reports: $(GPU_CHECK_OUT)/gpu_check_report.{md,json}.
gpu-check: setup
	bash scripts/gpu_check.sh --out $(GPU_CHECK_OUT) $(ARGS)

clean:
	rm -rf build *.egg-info visioncoach/*.so .pytest_cache
