#!/usr/bin/env bash
# Our CPU training engine against PyTorch (issue 13): same model, batch and thread count.
#
# For each row (tiny-cnn CE b128, tiny-cnn CE+JSD b128, allconv CE b128, wrn-40-2 CE b128,
# densenet CE b64) runs, ROUNDS times and interleaved,
#   ours:    deeprepair bench train --arch A --batch B [--jsd] --steps S --prefetch 0
#            with RAYON_NUM_THREADS=THREADS (rayon's pool and candle's GEMM split both read it);
#            we keep its "fixed" row: the model alone on one prepared batch
#   PyTorch: benchmarks/pytorch_cpu.py --arch A --batch B [--jsd] --steps S --threads THREADS
#            (torch.set_num_threads(THREADS), one inter-op thread), the same measurement
# and prints a Markdown table of medians: train img/s (clean images per second through
# forward + backward + SGD step; with JSD each image is forwarded as 3 views), eval img/s
# (no-grad eval-mode forward at the same batch) and ours / PyTorch (> 1: we are faster).
# Odd rounds run ours first, even rounds PyTorch first.
#
# Usage: benchmarks/cpu-vs-pytorch.sh            (from anywhere; runs in the repository root)
# Environment: ROUNDS (3), STEPS (5, timed steps per run after one warm-up step), THREADS
#   (nproc), ARCHS (only the rows of these architectures, space- or comma-separated, e.g.
#   ARCHS=tiny-cnn), BIN (target/release/deeprepair; not built here), PY
#   (/tmp/torchvenv/bin/python), LOG_DIR (each run's full output; default a new temp dir).
# Installs nothing, except: when PY is the default and missing, it creates /tmp/torchvenv and
# pip-installs torch and numpy into it (and says so). Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-5}
THREADS=${THREADS:-$(nproc)}
BIN=${BIN:-target/release/deeprepair}
DEFAULT_PY=/tmp/torchvenv/bin/python
PY=${PY:-$DEFAULT_PY}
ARCHS=${ARCHS:-}

# arch batch loss
ALL_ROWS=("tiny-cnn 128 CE" "tiny-cnn 128 CE+JSD" "allconv 128 CE" "wrn-40-2 128 CE"
          "densenet 64 CE")

die() { echo "cpu-vs-pytorch: $*" >&2; exit 1; }

[[ -x $BIN ]] || die "$BIN not found or not executable (build it first: cargo build --release)"
if [[ ! -x $PY ]]; then
  [[ $PY == "$DEFAULT_PY" ]] || die "PY=$PY not found"
  echo "cpu-vs-pytorch: $PY missing: creating /tmp/torchvenv and running" \
       "'pip install torch numpy' in it (a large download)" >&2
  python3 -m venv /tmp/torchvenv
  /tmp/torchvenv/bin/pip install torch numpy >&2
fi

ROWS=()
for row in "${ALL_ROWS[@]}"; do
  read -r arch _ _ <<< "$row"
  if [[ -z $ARCHS ]] || [[ " ${ARCHS//,/ } " == *" $arch "* ]]; then ROWS+=("$row"); fi
done
((${#ROWS[@]})) || die "ARCHS=$ARCHS matches no row (tiny-cnn, allconv, wrn-40-2, densenet)"
LOG_DIR=${LOG_DIR:-$(mktemp -d -t cpu-vs-pytorch.XXXXXX)}
mkdir -p "$LOG_DIR"

cpu_model=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -n1)
torch_info=$("$PY" -c 'import torch; print(f"torch {torch.__version__}, oneDNN (mkldnn) available: {torch.backends.mkldnn.is_available()}, CPU capability: {torch.backends.cpu.get_cpu_capability()}")')
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)

RAW=$LOG_DIR/raw.tsv   # key side round train eval
: > "$RAW"

run_ours() { # arch batch loss round
  local arch=$1 batch=$2 loss=$3 round=$4 log jsd=()
  [[ $loss == "CE+JSD" ]] && jsd=(--jsd)
  log=$LOG_DIR/ours-$arch-b$batch-$loss-r$round.txt
  RAYON_NUM_THREADS=$THREADS CANDLE_NUM_THREADS=$THREADS \
    "$BIN" bench train --arch "$arch" --batch "$batch" "${jsd[@]}" --steps "$STEPS" \
    --prefetch 0 > "$log" 2>&1 || { cat "$log" >&2; die "ours failed: see $log"; }
  # Columns: arch batch jsd device train eval batches ...; the "fixed" row is the model alone.
  awk -v a="$arch" '$1 == a && $7 == "fixed" { print $5, $6; n++ } END { exit n != 1 }' "$log" \
    || { cat "$log" >&2; die "no \"fixed\" row in $log"; }
}

run_torch() { # arch batch loss round
  local arch=$1 batch=$2 loss=$3 round=$4 log jsd=()
  [[ $loss == "CE+JSD" ]] && jsd=(--jsd)
  log=$LOG_DIR/torch-$arch-b$batch-$loss-r$round.txt
  OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS \
    "$PY" benchmarks/pytorch_cpu.py --arch "$arch" --batch "$batch" "${jsd[@]}" \
    --steps "$STEPS" --threads "$THREADS" > "$log" 2>&1 \
    || { cat "$log" >&2; die "PyTorch failed: see $log"; }
  awk '$1 == "RESULT" { for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
                        print v["train"], v["eval"]; n++ }
       END { exit n != 1 }' "$log" || { cat "$log" >&2; die "no RESULT line in $log"; }
}

measure() { # side arch batch loss round
  local side=$1 arch=$2 batch=$3 loss=$4 round=$5 out
  if [[ $side == ours ]]; then out=$(run_ours "$arch" "$batch" "$loss" "$round")
  else out=$(run_torch "$arch" "$batch" "$loss" "$round"); fi
  printf '%s|%s|%s\t%s\t%s\t%s\n' "$arch" "$batch" "$loss" "$side" "$round" "${out// /$'\t'}" >> "$RAW"
  printf '[round %d/%d] %-9s b%-4s %-7s %-7s train %8s img/s  eval %8s img/s\n' \
    "$round" "$ROUNDS" "$arch" "$batch" "$loss" "$side" ${out} >&2
}

echo "cpu-vs-pytorch: $ROUNDS rounds x ${#ROWS[@]} rows, $STEPS steps, $THREADS threads; logs in $LOG_DIR" >&2
for ((round = 1; round <= ROUNDS; round++)); do
  if ((round % 2)); then sides=(ours torch); else sides=(torch ours); fi
  for row in "${ROWS[@]}"; do
    read -r arch batch loss <<< "$row"
    for side in "${sides[@]}"; do measure "$side" "$arch" "$batch" "$loss" "$round"; done
  done
done
load_end=$(cut -d' ' -f1-3 /proc/loadavg)

# Median of column `col` (4 train, 5 eval) of the raw lines for key and side.
median() { # key side col
  awk -F'\t' -v k="$1" -v s="$2" -v c="$3" '$1 == k && $2 == s { print $c }' "$RAW" | sort -g |
    awk '{ a[NR] = $1 } END { if (!NR) print "nan"; else if (NR % 2) print a[(NR + 1) / 2];
                              else printf "%.1f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 > 0) printf "%.2f", a / b; else print "-" }'; }
values() { # key side col: the individual runs, comma-separated
  awk -F'\t' -v k="$1" -v s="$2" -v c="$3" '$1 == k && $2 == s { printf "%s%s", sep, $c; sep = ", " }' "$RAW"
}

echo "## Ours vs PyTorch on the CPU ($(date -u +%Y-%m-%d), commit $commit)"
echo
echo "- CPU: $cpu_model ($(nproc) logical CPUs); both sides on $THREADS threads"
echo "- $torch_info; ours: $BIN (fixed row of \`bench train\`)"
echo "- $ROUNDS rounds, $STEPS timed steps per run after one warm-up step; medians over rounds"
echo "- load average (1/5/15 min) at start: $load_start; at end: $load_end"
echo
echo "| arch | batch | loss | ours train img/s | PyTorch train img/s | ours/PyTorch train | ours eval img/s | PyTorch eval img/s | ours/PyTorch eval |"
echo "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for row in "${ROWS[@]}"; do
  read -r arch batch loss <<< "$row"
  key="$arch|$batch|$loss"
  ot=$(median "$key" ours 4) pt=$(median "$key" torch 4)
  oe=$(median "$key" ours 5) pe=$(median "$key" torch 5)
  echo "| $arch | $batch | $loss | $ot | $pt | $(ratio "$ot" "$pt") | $oe | $pe | $(ratio "$oe" "$pe") |"
done
echo
echo "train img/s: clean images per second through forward + backward + SGD step (Nesterov,"
echo "momentum 0.9, wd 5e-4) on one prepared batch (CE+JSD: 3 views per image in one forward,"
echo "CE on the clean third + 12 * JSD). eval img/s: no-grad eval-mode forward at the same batch."
echo "ratio > 1: ours is faster."
echo
echo "Individual runs (train | eval, img/s):"
echo
for row in "${ROWS[@]}"; do
  read -r arch batch loss <<< "$row"
  key="$arch|$batch|$loss"
  echo "- $arch b$batch $loss: ours $(values "$key" ours 4) | $(values "$key" ours 5);" \
       "PyTorch $(values "$key" torch 4) | $(values "$key" torch 5)"
done
