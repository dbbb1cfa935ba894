# The two commands a fresh machine needs:  make demo  and  make test.
VENV ?= .venv
PY := $(VENV)/bin/python
export LMCACHE_TRACK_USAGE := false
export DO_NOT_TRACK := 1

.PHONY: env demo test test-fast lint bench clean

env:
	bash scripts/setup_env.sh

demo: env
	$(PY) -m kvconn_plugin.demo

test: env
	$(PY) -m pytest -q tests

test-fast: env
	$(PY) -m pytest -q tests -m "not engine"

lint: env
	$(VENV)/bin/ruff check .

bench: env
	$(PY) benchmarks/bench_protocol.py
	$(PY) benchmarks/bench_transfer.py
	$(PY) benchmarks/bench_load.py
	$(PY) benchmarks/bench_lookup_flood.py
	$(PY) benchmarks/bench_e2e.py

clean:
	rm -rf build dist *.egg-info kvconn_plugin/lib kvconn_plugin/_build_info.py
