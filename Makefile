# The two commands a fresh machine needs:  make demo  and  make test.
VENV ?= .venv
PY := $(VENV)/bin/python
# vLLM 0.33's Python parts (scheduler, config, factory) on CPU; no model execution there.
VENV033 ?= .venv033
PY033 := $(VENV033)/bin/python
# What runs against vLLM 0.33: everything that needs no engine and depends on vLLM's API.
TESTS_033 := tests/unit tests/integration/test_scheduler_adapter.py \
	tests/integration/test_soak.py tests/integration/test_offloading_route.py \
	tests/integration/test_sleep_and_reset.py tests/integration/test_spec_decode_stores.py \
	tests/integration/test_local_hits.py \
	tests/integration/test_doctor.py::test_doctor_reports_a_kv_format_the_connector_cannot_move
export LMCACHE_TRACK_USAGE := false
export DO_NOT_TRACK := 1

.PHONY: env env-033 demo test test-032 test-033 test-slow test-chaos test-fast lint bench clean

env:
	bash scripts/setup_env.sh

demo: env
	$(PY) -m kvconn_plugin.demo

env-033:
	VENV033=$(VENV033) bash scripts/setup_env_033.sh

# The longest real-engine scenarios (marker "slow": TP=2, PP=2 and MLA chains, two servers
# under TP=2, Redis L2, the hybrid model, the second mixed-implementation geometry, the chaos
# episodes) run in `make test-slow`, which CI runs after `make test`.
RUN_032 = $(PY) -m pytest -q tests -m "not slow"
# The LMCache server comes from the main environment ($(VENV)); the soak is shortened.
RUN_033 = VLLM_TARGET_DEVICE=cpu KVCONN_TEST_LMCACHE_BIN=$(abspath $(VENV))/bin/lmcache \
	KVCONN_SOAK_REQUESTS=2000 $(PY033) -m pytest -q -m "not engine" $(TESTS_033)

# The suite on vLLM 0.32 (all but "slow") and the vLLM 0.33 job, in two streams side by side:
# the real-engine tests one at a time, and everything else followed by the 0.33 job
# (scripts/run_tests.sh; the second stream's log is printed at the end). Either failing fails.
test: env
	VENV=$(VENV) VENV033=$(VENV033) bash scripts/run_tests.sh

test-032: env
	$(RUN_032)

test-033: env env-033
	$(RUN_033)

test-slow: env
	$(PY) -m pytest -q tests -m slow

test-chaos: env
	$(PY) -m pytest -q tests -m chaos

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
	$(PY) benchmarks/bench_l2.py

clean:
	rm -rf build dist *.egg-info kvconn_plugin/lib kvconn_plugin/_build_info.py
