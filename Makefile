# `make test` and `make beauty` set up .venv from nothing (CPU torch first, so no multi-GB CUDA build is pulled).
PY := .venv/bin/python
TORCH ?= torch==2.13.0

.venv/installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

setup: .venv/installed

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile

beauty: setup
	.venv/bin/m2rec fit --config configs/beauty.yaml --config configs/shared/beauty.yaml

.PHONY: setup test beauty
