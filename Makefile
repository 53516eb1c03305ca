# The two commands of the README: `make demo` and `make test`. Both build .venv (Python 3.12) first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# A working Python 3.12: on PATH, else through pyenv (a pyenv shim may exist yet fail, so each one is tried).
PYTHON312 ?= $(shell for c in python3.12 $$(ls -d $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12 2>/dev/null | sort -rV); do \
	$$c -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { command -v $$c; break; }; done)

.PHONY: demo test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	@test -n "$(PYTHON312)" || { echo "error: no Python 3.12 found on PATH or through pyenv; install one (e.g. 'pyenv install 3.12')" >&2; exit 1; }
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torchvision, qwen-vl-utils (its smart_resize is stood in for by name) and decord (its reader when installed, as
	# in the release's lmms-eval) run the release's video pipeline, the oracle of tests/eval/test_video_pixels.py;
	# resolved with torch in one go so the builds match.
	$(PY) -m pip install -q -e '.[test]' torchvision qwen-vl-utils==0.0.14 decord==0.6.0
	# lmms-eval's own answer parsers are the oracle of tests/eval/test_eval_scoring.py: its files, not its dependencies.
	$(PY) -m pip install -q --no-deps lmms-eval==0.7.3
	touch $@

demo: venv
	$(PY) -m launch.demo

test: venv
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n 2 --durations=15 tests

clean:
	rm -rf $(VENV)
