#!/usr/bin/env bash
# Data-parallel ranks as a gang of worker processes vs as threads vs one rank: a pretrain
# stage's wall time (from `deeprepair status --json`) and its model digest, three runs each.
# Usage: benchmarks/gang-vs-threads.sh [BINARY] [DATA]   (defaults: target/release/deeprepair,
# ../shared/data/cifar10-lossless-subset). Writes its manifests and stores under a temp dir.
set -euo pipefail
BIN=$(realpath "${1:-target/release/deeprepair}")
DATA=$(realpath "${2:-../shared/data/cifar10-lossless-subset}")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
for ranks in 1 2; do
  cat > "$WORK/r$ranks.yaml" <<YAML
name: gang-vs-threads
vars:
  data: UNSET
stages:
  train-data: {kind: dataset, params: {path: "\${data}", split: train, per_class: 100}}
  base:
    kind: pretrain
    params: {arch: tiny-cnn, epochs: 3, batch: 128, lr: 0.05, ranks: $ranks}
    inputs: {train: train-data}
YAML
done
printf '%-8s %-4s %10s  %-12s  %s\n' config run "stage (s)" model worker
for run in 1 2 3; do
  for config in "one-rank r1.yaml" "threads r2.yaml" "gang r2.yaml --workers 2"; do
    set -- $config
    name=$1 manifest=$2
    shift 2
    store="$WORK/store-$name-$run/store.redb"
    DEEPREPAIR_STORE=$store "$BIN" run --plain "$WORK/$manifest" --data "$DATA" "$@" > /dev/null 2>&1
    DEEPREPAIR_STORE=$store "$BIN" status --json | NAME=$name RUN=$run python3 -c '
import json, os, sys
for r in json.load(sys.stdin)["stages"]:
    if r["stage"] == "base":
        print("%-8s %-4s %10.2f  %-12s  %s" % (os.environ["NAME"], os.environ["RUN"],
              (r["ended_ms"] - r["started_ms"]) / 1000, r["outputs"]["model"][:12], r["worker"]))'
  done
done
