# bnbook: two commands build and test everything; each sets itself up.
#   make book   - execute every notebook and build the HTML book into _build/html
#   make test   - unit tests + every notebook executed by nbmake
#   make site-test - after `make book`: the built site checked in headless Chromium
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.bnbook-installed
# Progress bars are for people at a terminal; builds and tests stay quiet.
export BNBOOK_QUIET ?= 1

.PHONY: book test site-test lint format clean venv benchmark

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e . \
	  || $(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build . --all -W -n --keep-going

test: $(STAMP)
	$(BIN)/python -m pytest

# After `make book`: open every page of _build/html in headless Chromium with
# networking off (tests/test_site.py, marker "site"; needs Debian's chromium and
# chromium-driver). Screenshots go to _build/screenshots/.
site-test: $(STAMP)
	$(BIN)/python -m pytest -n 0 -m site tests/test_site.py

lint: $(STAMP)
	$(BIN)/ruff check bnbook tests notebooks benchmarks
	$(BIN)/ruff format --check bnbook tests notebooks benchmarks

format: $(STAMP)
	$(BIN)/ruff format bnbook tests notebooks benchmarks
	$(BIN)/ruff check --fix bnbook tests notebooks benchmarks

benchmark: $(STAMP)
	for f in benchmarks/*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf _build .pytest_cache
