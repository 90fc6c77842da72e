# Two commands take a fresh clone to working:
#   make demo   - installs into .venv, then runs the whole pipeline on built-in synthetic data
#   make test   - installs into .venv (with test tools), then runs the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install

# the package and what it needs to run (make demo needs no more)
$(BIN)/dpl: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(BIN)/dpl

# the test and lint tools on top (pytest, pytest-xdist, ruff, Label Studio's converter for a
# format test)
$(VENV)/.dev-installed: $(BIN)/dpl
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/dpl

# offline machines: the ImageNet backbone from ../shared/weights when it is there
WEIGHTS := ../shared/weights/mobilenet_v2-b0353104.pth

demo: install
	$(BIN)/dpl demo --out dpl-demo $(if $(wildcard $(WEIGHTS)),--backbone-weights $(WEIGHTS))

# one 1-thread test worker per core (at most 4), a test file's tests on one worker so its
# module fixtures are built once
test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
