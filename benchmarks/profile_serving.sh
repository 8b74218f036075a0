#!/usr/bin/env bash
# Where the host time goes when `slicelm serve` is saturated: py-spy samples of the benchmark client,
# the API server and the engine-core process during `serving.py --rates inf`.
#
#   bash benchmarks/profile_serving.sh OUTDIR        # needs py-spy on PATH; SERVER_ARGS="-asc 2" etc.
#
# Writes OUTDIR/serving.log, OUTDIR/top.txt and one collapsed-stack file per process
# (<role>.txt: client, api, child<pid> for the engine core and the resource tracker); summarise them with benchmarks/pyspy_summary.py.
set -u
OUTDIR=${1:?usage: profile_serving.sh OUTDIR}
N=${N:-1024}
SECS=${SECS:-8}
mkdir -p "$OUTDIR"
python3 benchmarks/serving.py --rates inf --num-requests "$N" --name prof_serving \
    ${SERVER_ARGS:+--server-args "$SERVER_ARGS"} >"$OUTDIR/serving.log" 2>&1 &
BENCH=$!
until grep -q "serving '" "$OUTDIR/serving.log" || ! kill -0 $BENCH 2>/dev/null; do sleep 0.5; done
sleep "${DELAY:-4}"
SERVER=$(pgrep -f "slicelm.entrypoints.cli serve" | head -1)
pids="client:$BENCH api:$SERVER"
for p in $(pgrep -P "$SERVER"); do pids="$pids child$p:$p"; done  # the engine core (and -asc servers)
for pair in $pids; do
    role=${pair%%:*}; pid=${pair##*:}
    py-spy record --nonblocking -r 200 -d "$SECS" -f raw -o "$OUTDIR/$role.txt" -p "$pid" >/dev/null 2>&1 &
done
top -b -n 3 -d 2 -c -w 200 | grep -E "python|slicelm|PID" >"$OUTDIR/top.txt" &
wait
tail -3 "$OUTDIR/serving.log"
