# Two commands on a fresh machine: `make test` and `make run`. Both create .venv when missing and
# install everything the project needs (llama-cpp-python is built from source the first time,
# about 7 minutes on 2 cores, then pip's wheel cache makes it quick).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.evoray-installed
CONFIG ?= configs/demo.yaml

.PHONY: setup test run bench bench-full chromium clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[local,dev]'
	touch $(STAMP)

# Debian's chromium renders report.html in a test; without it the test parses the HTML instead.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "note: could not install chromium; the report test will parse the HTML instead"; \
	  else echo "note: chromium absent and not root; the report test will parse the HTML instead"; fi; }

test: $(STAMP) chromium
	$(PY) -m pytest -q -ra

run: $(STAMP)
	$(VENV)/bin/evoray run $(CONFIG)

bench: $(STAMP)
	$(PY) bench/run_all.py

# `make bench` runs B5's 1,000,000 rows once; bench-full runs them three times for a median (about 30 min)
bench-full: $(STAMP)
	$(PY) bench/run_all.py b5full

clean:
	rm -rf out .pytest_cache
