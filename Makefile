# `make test` and `make beauty` set up .venv from nothing. torch comes first, as TORCH names it, so that its build is the
# one chosen and no other is pulled in as a dependency: on Linux PyPI's default is a CUDA build; for the CPU build use
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# and on a GPU machine `make setup TORCH=torch`. TORCH is left unquoted so that it may carry pip options.
PY := .venv/bin/python
TORCH ?= torch==2.13.0
# the documentation site (git-ignored, under build/)
SITE := build/site
# mkdocs-material's banner about its successor is not a build message
export NO_MKDOCS_2_WARNING := 1

.venv/installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,bench,docs]"
	touch $@

setup: .venv/installed

# The tests, then the documentation site with --strict: a broken link or anchor, a page missing from the nav or an API
# reference that no longer resolves fails the build. Not `mkdocs build -q`: quiet mode drops the warnings before
# --strict counts them, so a broken site would pass. The log is printed only when the build fails.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile
	@mkdir -p build
	@$(PY) -m mkdocs build --strict -d $(SITE) > build/mkdocs.log 2>&1 || { cat build/mkdocs.log; exit 1; }
	@echo "docs: mkdocs build --strict passed ($(SITE))"

docs: setup
	$(PY) -m mkdocs build --strict -d $(SITE)

beauty: setup
	.venv/bin/m2rec fit --config configs/beauty.yaml --config configs/shared/beauty.yaml

.PHONY: setup test docs beauty
