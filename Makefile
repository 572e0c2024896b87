# Two commands do all the set-up on a fresh machine (see README):
#   make demo   create/reuse the venv, install, generate the default data and run the main job
#   make test   create/reuse the venv, install, run the test suite
SHELL := /bin/bash
VENV = $(shell scripts/venv.sh)
DEMO_DIR ?= outputs/demo
PYTEST_ARGS ?=

.PHONY: demo test test-slow lint venv bench clean

venv:
	@scripts/venv.sh

# PYTHONPATH: this checkout's segreport first. The venv is shared between checkouts (keyed by the
# dependency spec), and its editable install points at whichever checkout ran make last.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

demo:
	@V=$$(scripts/venv.sh) && $$V/bin/python -m segreport.demo --out $(DEMO_DIR)

test:
	@scripts/lint.sh
	@V=$$(scripts/venv.sh) && HF_HUB_OFFLINE=1 $$V/bin/python -m pytest -q $(PYTEST_ARGS)

lint:
	@scripts/lint.sh

test-slow:
	@V=$$(scripts/venv.sh) && HF_HUB_OFFLINE=1 $$V/bin/python -m pytest -q -m slow $(PYTEST_ARGS)

bench:
	@V=$$(scripts/venv.sh) && for b in benchmarks/bench_*.py; do $$V/bin/python $$b || exit 1; done

clean:
	rm -rf outputs .venv
