#!/bin/bash
# usage: bench.sh BIN NAME MANIFEST [cache]  (issue 16; results in $OUT, default /tmp/dpbench)
# Runs MANIFEST on 2 CPU workers after making its `testset` stage in-process; prints wall time,
# the peak RSS of the run process (VmHWM, sampled every 0.1 s) and the coordinator's
# "data plane" line (artifacts and bytes sent and received); with "cache", the workers share
# $DEEPREPAIR_CACHE_DIR.
set -e
BIN=$1; NAME=$2; MAN=$3; CACHE=$4
D=${OUT:-/tmp/dpbench}/$NAME; rm -rf $D; mkdir -p $D; cp $MAN $D/m.yaml
export DEEPREPAIR_LOG=info
unset DEEPREPAIR_CACHE_DIR
# Inputs first (not timed): the stage that makes the shared artifact.
$BIN run --plain -j 2 --only testset $D/m.yaml > $D/prep.log 2>&1
[ -n "$CACHE" ] && export DEEPREPAIR_CACHE_DIR=$D/cache
start=$(date +%s.%N)
$BIN run --plain -j 2 --workers 2 $D/m.yaml > $D/run.log 2>&1 &
pid=$!
hwm=0
while kill -0 $pid 2>/dev/null; do
  v=$(awk '/VmHWM/{print $2}' /proc/$pid/status 2>/dev/null || true)
  [ -n "$v" ] && [ "$v" -gt "$hwm" ] && hwm=$v
  sleep 0.1
done
wait $pid; rc=$?
end=$(date +%s.%N)
echo "$NAME rc=$rc wall=$(echo "$end - $start" | bc) s peak_rss_run=$((hwm/1024)) MiB"
grep -h "data plane" $D/run.log || true
grep -h "artifact cache" $D/.deeprepair/workers/*.log 2>/dev/null | grep -c fetched || true
