# Set-up and the two main jobs. `make serve` and `make test` work on a fresh machine:
# they create .venv/ (torch 2.13.0 CPU first: a bare `torch` would pull a multi-GB CUDA build),
# install pagedllm into it, and fetch the embedded default model on first use.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup serve test lint clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
	# xgrammar without its declared triton dependency (GPU-only; its needs are in pyproject)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps xgrammar==0.2.9
	touch $(STAMP)

setup: $(STAMP)
	@# The real Prometheus server for tests/deploy/test_prometheus.py, where apt works.
	@command -v prometheus >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	  && { apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 \
	       || { apt-get update -q >/dev/null 2>&1 \
	            && apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1; }; }; } \
	  || echo "note: prometheus not installed (no apt or not root): its test will be skipped"
	$(VENV)/bin/python -m pagedllm.model_executor.ops.build
	$(VENV)/bin/python -c "from pagedllm.model_executor.loader import ensure_default_model as f; print(f())"

serve: setup
	$(VENV)/bin/pagedllm serve $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest $(ARGS)

lint: setup
	$(VENV)/bin/ruff check pagedllm tests

clean:
	rm -rf $(VENV) build *.egg-info
