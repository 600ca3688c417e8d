#!/usr/bin/env bash
# A sweep of N short util.work stages (1 s each) through a real local Slurm cluster
# (tests/slurm/start-cluster.sh, one node declared with 64 CPUs), against the same manifest
# in-process. Reports: jobs in flight over time (sampled every 2 s), the run's squeue calls per
# minute (an squeue wrapper on its PATH logs them), wall time, and the head's peak RSS.
#
#   sudo benchmarks/slurm-sweep.sh [N=1000] [BIN=target/debug/deeprepair] [extra run args...]
#   IN_PROCESS=0 skips the in-process run (it takes N/cores seconds).
#   NODES=2 runs the two-node test cluster (each slurmd in its own network namespace, 32 CPUs
#   declared each; the run advertises the bridge address to its workers).
#
# Needs root and Slurm (tests/slurm/install.sh). Leaves nothing running.
set -euo pipefail
N="${1:-1000}"
BIN="$(realpath "${2:-target/debug/deeprepair}")"
shift 2 2>/dev/null || shift $#
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d)"
CLUSTER="$WORK/cluster"
trap 'bash "$HERE/tests/slurm/stop-cluster.sh" "$CLUSTER" >/dev/null 2>&1 || true' EXIT

NODES="${NODES:-1}"
SLURM_TEST_NODES="$NODES" SLURM_TEST_GPUS=0 SLURM_TEST_CPUS=$(( 64 / NODES )) \
    SLURM_TEST_MEM_MB=$(( 256000 / NODES )) \
    bash "$HERE/tests/slurm/start-cluster.sh" "$CLUSTER" >/dev/null
export SLURM_CONF="$CLUSTER/slurm.conf"
ADVERTISE=()
if [ "$NODES" -gt 1 ]; then
    ADVERTISE=(--advertise "$(cat "$CLUSTER/ctld-addr")")
fi

seeds=$(seq -s, 1 "$N")
cat >"$WORK/sweep.yaml" <<YAML
grid:
  seed: [$seeds]
stages:
  w:
    kind: util.work
    over: [seed]
    params: {steps: 10, step_ms: 100}
    resources: {cpus: 1, mem_mb: 100}
YAML

mkdir -p "$WORK/bin"
REAL_SQUEUE="$(command -v squeue)"
cat >"$WORK/bin/squeue" <<SH
#!/bin/sh
echo "\$(date +%s.%N) \$*" >> "$WORK/squeue-calls.log"
exec "$REAL_SQUEUE" "\$@"
SH
chmod +x "$WORK/bin/squeue"

# jobs in flight (pending + running), every 2 s, until the run ends
( while [ ! -e "$WORK/done" ]; do
      echo "$(date +%s) $("$REAL_SQUEUE" -h -t PENDING,RUNNING -o %i | wc -l)"
      "$REAL_SQUEUE" -h -t RUNNING -o %N >>"$WORK/running-on.log" || true
      sleep 2
  done ) >"$WORK/in-flight.log" &
SAMPLER=$!

start=$(date +%s.%N)
PATH="$WORK/bin:$PATH" /usr/bin/time -f "%M" -o "$WORK/rss.txt" \
    "$BIN" run --plain --slurm --store "$WORK/slurm.redb" "${ADVERTISE[@]}" "$@" "$WORK/sweep.yaml" \
    >"$WORK/run.log" 2>&1
end=$(date +%s.%N)
touch "$WORK/done"
wait "$SAMPLER" || true

if [ "${IN_PROCESS:-1}" != 0 ]; then
    istart=$(date +%s.%N)
    "$BIN" run --plain --store "$WORK/inproc.redb" "$WORK/sweep.yaml" >"$WORK/inproc.log" 2>&1
    iend=$(date +%s.%N)
fi

calls=$(wc -l <"$WORK/squeue-calls.log")
wall=$(echo "$end - $start" | bc -l)
printf 'stages: %s on %s node(s)\n' "$N" "$NODES"
echo "running jobs seen per node (samples every 2 s): $(sort "$WORK/running-on.log" 2>/dev/null | uniq -c | tr -s ' ' | tr '\n' ';')"
printf 'slurm run: %.1f s wall, %s squeue calls (%.2f per minute), head peak RSS %s MB\n' \
    "$wall" "$calls" "$(echo "$calls * 60 / $wall" | bc -l)" "$(( $(cat "$WORK/rss.txt") / 1024 ))"
if [ "${IN_PROCESS:-1}" != 0 ]; then
    printf 'in-process run (%s cores): %.1f s wall\n' "$(nproc)" "$(echo "$iend - $istart" | bc -l)"
fi
printf 'jobs in flight (max %s); every 2 s:\n' "$(awk '{ if ($2 > m) m = $2 } END { print m }' "$WORK/in-flight.log")"
awk 'NR == 1 { t0 = $1 } { printf "  t=%3ds %s\n", $1 - t0, $2 }' "$WORK/in-flight.log" | awk 'NR % 5 == 1'
tail -1 "$WORK/run.log"
echo "logs: $WORK"
