#!/usr/bin/env bash
# Runs production-stack's own end-to-end routing test, UNCHANGED, against `slicelm router` in front of two local
# SmolLM2 replicas, for roundrobin, session and prefixaware (the test reads the router's log).
#
#   bash benchmarks/router_e2e.sh /path/to/production-stack/tests/e2e/test-routing.py [out.log]
#
# The test file comes from vllm-project/production-stack (checked at a6c01db); it is not part of this repository.
# Writes its output (and the commands) to benchmarks/results/router_e2e_test_routing.log by default.
set -euo pipefail
TEST_FILE=$(realpath "${1:?usage: router_e2e.sh path/to/test-routing.py [out.log]}")
cd "$(dirname "$0")/.."
OUT=${2:-benchmarks/results/router_e2e_test_routing.log}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MODEL=smollm2-135m-instruct
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

wait_http() {  # url seconds
  for _ in $(seq 1 $(( $2 * 4 ))); do
    if "$PY" -c "import sys, httpx; sys.exit(httpx.get('$1', timeout=1).status_code != 200)" 2>/dev/null; then
      return 0; fi
    sleep 0.25
  done
  echo "timed out waiting for $1" >&2; return 1
}

{
  echo "# production-stack tests/e2e/test-routing.py (sha256 $(sha256sum "$TEST_FILE" | cut -d' ' -f1)), unchanged"
  echo "# against slicelm router $(git rev-parse --short HEAD) on $(date -u +%FT%TZ), backends: 2 x slicelm serve $MODEL (CPU)"
} > "$OUT"

for port in 18101 18102; do
  "$PY" -m slicelm.entrypoints.cli serve "$MODEL" --host 127.0.0.1 --port $port --device cpu --disable-access-log \
    --max-num-seqs 8 --max-model-len 2048 > "$WORK/serve-$port.log" 2>&1 &
  PIDS+=($!)
done
wait_http http://127.0.0.1:18101/health 300
wait_http http://127.0.0.1:18102/health 300

status=0
for logic in roundrobin session prefixaware; do
  LOG="$WORK/router-$logic.log"
  ROUTER_CMD=("$PY" -m slicelm.entrypoints.cli router --host 127.0.0.1 --port 30080 --service-discovery static
    --static-backends http://127.0.0.1:18101,http://127.0.0.1:18102 --static-models "$MODEL,$MODEL"
    --static-model-types chat,chat --log-stats --log-stats-interval 10 --engine-stats-interval 10
    --request-stats-window 10 --static-model-labels prefill,decode --session-key x-user-id --routing-logic "$logic")
  "${ROUTER_CMD[@]}" > "$LOG" 2>&1 &
  RPID=$!
  wait_http http://127.0.0.1:30080/health 60
  TEST_CMD=("$PY" "$TEST_FILE" --num-requests 20 --log-file-path "$LOG" --router-url http://localhost:30080
    --routing-logic "$logic" --result-dir "$WORK/results" --discovery-type static --session-key x-user-id
    --model "$MODEL")
  { echo; echo "## $logic"; echo "\$ ${ROUTER_CMD[*]#$PWD/}"; echo "\$ ${TEST_CMD[*]}"; } >> "$OUT"
  if "${TEST_CMD[@]}" >> "$OUT" 2>&1; then echo "## $logic: PASSED" >> "$OUT"; else echo "## $logic: FAILED" >> "$OUT"; status=1; fi
  kill $RPID; wait $RPID 2>/dev/null || true
done
sed -i "s#$WORK#<tmp>#g" "$OUT"
grep '^## .*: ' "$OUT"
exit $status
