#!/usr/bin/env bash
# `make test`: the suite on vLLM 0.32 (all but marker "slow") and the vLLM 0.33 job, as two
# streams side by side. One stream runs the real-engine tests one at a time (an engine takes
# the cores), then the soak; the other runs everything else without an engine (mostly waiting
# on LMCache servers and sockets), then sets up and runs the vLLM 0.33 job. Any failure fails
# the run.
#
# Per-test /dev/shm checks cannot tell two concurrent pytest processes' generic segments
# apart (KVCONN_TEST_PARALLEL_STREAMS); a check over the whole run covers them instead.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VENV033=${VENV033:-.venv033}
PY="$VENV/bin/python"
LOGS=build/test-logs
mkdir -p "$LOGS"
export KVCONN_TEST_PARALLEL_STREAMS=1 LMCACHE_TRACK_USAGE=false DO_NOT_TRACK=1
PYTEST=(-m pytest -q -p no:cacheprovider)
TESTS_033=(tests/unit tests/integration/test_scheduler_adapter.py
  tests/integration/test_soak.py tests/integration/test_offloading_route.py
  tests/integration/test_sleep_and_reset.py tests/integration/test_spec_decode_stores.py
  tests/integration/test_local_hits.py
  tests/integration/test_doctor.py::test_doctor_reports_a_kv_format_the_connector_cannot_move)

# The 10,000-request soak (about 2 min of one core) runs in the engine stream, after the
# engines: with engines starting in one process where they can, that stream finished first.
SOAK=tests/integration/test_soak.py::test_soak_10k_requests_no_leaks

"$PY" -m tests.helpers.shm_check snapshot "$LOGS/shm-before.json"
t0=$(date +%s)

no_engine() {
  local rc=0
  echo "== vLLM 0.32, no engine: pytest tests -m 'not slow and not engine'"
  "$PY" "${PYTEST[@]}" --basetemp=/tmp/kvconn-tests-no-engine tests \
    -m "not slow and not engine" --deselect "$SOAK" || rc=1
  echo "== vLLM 0.33 set-up"
  if VENV033="$VENV033" bash scripts/setup_env_033.sh; then
    # The LMCache server comes from the main environment; the soak is shortened.
    echo "== vLLM 0.33: pytest -m 'not engine' ${TESTS_033[*]}"
    VLLM_TARGET_DEVICE=cpu KVCONN_TEST_LMCACHE_BIN="$(pwd)/$VENV/bin/lmcache" \
      KVCONN_SOAK_REQUESTS=2000 "$VENV033/bin/python" "${PYTEST[@]}" \
      --basetemp=/tmp/kvconn-tests-033 -m "not engine" "${TESTS_033[@]}" || rc=1
  else
    rc=1
  fi
  echo "== no-engine stream done after $(( $(date +%s) - t0 )) s (rc=$rc)"
  return $rc
}

no_engine > "$LOGS/no-engine.log" 2>&1 &
other=$!
# A CI time-out must not swallow the other stream's output.
trap 'echo "== no-engine stream so far:"; cat "$LOGS/no-engine.log"; kill $other 2>/dev/null' \
  INT TERM

echo "== vLLM 0.32, real engines: pytest tests -m 'engine and not slow'" \
  "(the no-engine stream and the vLLM 0.33 job run meanwhile: $LOGS/no-engine.log)"
"$PY" "${PYTEST[@]}" --basetemp=/tmp/kvconn-tests-engine tests -m "engine and not slow"
rc_engine=$?
echo "== vLLM 0.32, the soak: pytest $SOAK"
"$PY" "${PYTEST[@]}" --basetemp=/tmp/kvconn-tests-soak "$SOAK" || rc_engine=1
echo "== engine stream done after $(( $(date +%s) - t0 )) s (rc=$rc_engine)"
wait $other
rc_other=$?
trap - INT TERM
cat "$LOGS/no-engine.log"
"$PY" -m tests.helpers.shm_check check "$LOGS/shm-before.json"
rc_shm=$?
echo "== make test: engines rc=$rc_engine, no-engine + vLLM 0.33 rc=$rc_other," \
  "/dev/shm rc=$rc_shm, $(( $(date +%s) - t0 )) s"
[ $rc_engine -eq 0 ] && [ $rc_other -eq 0 ] && [ $rc_shm -eq 0 ]
