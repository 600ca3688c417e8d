#!/usr/bin/env bash
# One script for a GPU session: `pack` runs HERE (the GPU-less build machine); every other
# subcommand runs on the H100 host through the device tool, in the repository root, with the
# git-ignored folder gpu-carry/ carried along (run tool: carry=["gpu-carry"]). Each subcommand
# fits in the tool's 10-minute cap and writes its logs to $OUT (default /tmp/gpu-session-out).
#
#   bash benchmarks/gpu-session.sh pack     # here, after the CUDA build (see benchmarks/README.md)
#   bash benchmarks/gpu-session.sh env      # there: nvidia-smi, ldd, versions          (~10 s)
#   bash benchmarks/gpu-session.sh nccl     # there: the NCCL tests (incl. --ignored)    (~1 min)
#   bash benchmarks/gpu-session.sh torch    # there: PyTorch WRN-40-2 reference, all modes (~2 min)
#   bash benchmarks/gpu-session.sh candle   # there: deeprepair bench train --gpu 0      (~3 min)
#   bash benchmarks/gpu-session.sh cudnn    # there: cuDNN conv + BN tests, bench cuDNN off/on (~6 min)
#   bash benchmarks/gpu-session.sh smoke    # there: manifests/smoke.yaml --gpus 0       (≤ 9.5 min; run again to resume)
#
# The host has no Rust and no network: everything it runs is in gpu-carry/ (a stripped,
# gzipped binary, the compressed NCCL and cuDNN test executables, a CIFAR-10 JPEG subset) or in
# the tree.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here" || exit 1
CARRY=${GPU_CARRY:-gpu-carry}
OUT=${OUT:-/tmp/gpu-session-out}
TORCH_PY=${TORCH_PY:-/opt/torch/.venv/bin/python3}
WORK=${GPU_SESSION_WORK:-/tmp/deeprepair-gpu}   # unpacked binaries, the smoke store
BIN=$WORK/deeprepair
TESTS=$WORK/nccl-tests
mkdir -p "$OUT" "$WORK"

log() { echo "[gpu-session $(date -u +%H:%M:%S)] $*" >&2; }
die() { log "error: $*"; exit 1; }

# CUDA 13 libraries (cuBLAS, cuRAND, NCCL, cuDNN, NVRTC) come from PyTorch's venv.
cuda_libs() {
  local libs
  libs=$(find /opt/torch/.venv -path '*nvidia*' -type d -name lib 2>/dev/null | tr '\n' ':')
  export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:-}
}

# Writes the decompressed FILE (.gz, or .xz: xz, else Python's lzma) to stdout.
decompress() {
  case $1 in
    *.gz) gunzip -c "$1" ;;
    *.xz)
      if command -v xz >/dev/null 2>&1; then
        xz -dc "$1"
      else
        "$TORCH_PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$1"
      fi ;;
    *) return 1 ;;
  esac
}

# Unpacks gpu-carry/NAME.gz or NAME.xz to DEST once per host (re-done when the carried file is
# newer).
unpack() {
  local name=$1 dest=$2 src=""
  if [ -f "$CARRY/$name.gz" ]; then src=$CARRY/$name.gz
  elif [ -f "$CARRY/$name.xz" ]; then src=$CARRY/$name.xz
  else return 1
  fi
  if [ ! -x "$dest" ] || [ "$src" -nt "$dest" ]; then
    decompress "$src" > "$dest.tmp" && chmod +x "$dest.tmp" && mv "$dest.tmp" "$dest" || return 1
  fi
}

need_bin() {
  cuda_libs
  unpack deeprepair "$BIN" || die "no $CARRY/deeprepair.gz: run 'pack' on the build machine and carry $CARRY"
}

# Runs a command with a time limit, its output to the terminal and to $OUT/NAME.log.
run_logged() {
  local name=$1 limit=$2; shift 2
  log "$name: $* (limit ${limit}s)"
  local start=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  log "$name: exit $rc after $((SECONDS - start)) s"
  echo "exit $rc after $((SECONDS - start)) s" >> "$OUT/$name.log"
  return "$rc"
}

cmd_env() {
  cuda_libs
  {
    echo "== date"; date -u
    echo "== host"; uname -a; nproc; free -g | head -2
    echo "== nvidia-smi"; nvidia-smi 2>&1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit,mig.mode.current \
      --format=csv 2>&1
    echo "== torch"
    "$TORCH_PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no cuda")' 2>&1
    echo "== LD_LIBRARY_PATH"; echo "$LD_LIBRARY_PATH" | tr ':' '\n'
    echo "== carried"; ls -la "$CARRY" 2>&1; cat "$CARRY/MANIFEST.txt" 2>/dev/null
    if unpack deeprepair "$BIN"; then
      echo "== ldd deeprepair"; ldd "$BIN"
      if ldd "$BIN" | grep -q "not found"; then echo "!! unresolved libraries above"; fi
      echo "== deeprepair --version"; "$BIN" --version 2>&1
      echo "== deeprepair bench train --help"; "$BIN" bench train --help 2>&1
    else
      echo "!! no $CARRY/deeprepair.gz"
    fi
    if unpack nccl-tests "$TESTS"; then
      echo "== ldd nccl-tests"; ldd "$TESTS"
    fi
    if unpack cudnn-tests "$WORK/cudnn-tests"; then
      echo "== ldd cudnn-tests"; ldd "$WORK/cudnn-tests"
    fi
    if unpack cudnn-bn-tests "$WORK/cudnn-bn-tests"; then
      echo "== ldd cudnn-bn-tests"; ldd "$WORK/cudnn-bn-tests"
    fi
  } 2>&1 | tee "$OUT/env.log"
}

cmd_nccl() {
  cuda_libs
  unpack nccl-tests "$TESTS" || die "no $CARRY/nccl-tests.xz (pack copies the deeprepair-workers test executable built with --features nccl)"
  export RUST_BACKTRACE=1 NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # Every test of the crate (the data-parallel thread backend too), then the GPU-only ones one
  # at a time so a hang or NCCL refusal is attributed to one test.
  run_logged nccl 120 "$TESTS" --test-threads=1
  local t
  for t in $("$TESTS" --list --ignored 2>/dev/null | sed -n 's/: test$//p'); do
    run_logged nccl 150 "$TESTS" --ignored --exact "$t" --nocapture --test-threads=1
  done
  # Synchronized BatchNorm on the GPU (the trainer's data-parallel tests, GPU ones included).
  if unpack dp-tests "$WORK/dp-tests"; then
    run_logged nccl 240 "$WORK/dp-tests" --include-ignored --nocapture --test-threads=1
  else
    log "no $CARRY/dp-tests.xz: synchronized BatchNorm on the GPU not checked"
  fi
  grep -E "^test |test result|NCCL (refused|accepted|version)|panicked|max weight difference" "$OUT/nccl.log" > "$OUT/nccl-summary.txt"
  cat "$OUT/nccl-summary.txt"
}

cmd_cudnn() {
  cuda_libs
  unpack cudnn-tests "$WORK/cudnn-tests" \
    || die "no $CARRY/cudnn-tests.xz (pack copies the deeprepair-nn cudnn_conv test executable built with --features cudnn)"
  export RUST_BACKTRACE=1
  # cuDNN forward and both gradients against candle's CUDA conv and the CPU path, then one
  # WRN-40-2 step with and without cuDNN (all #[ignore]d: they need the GPU).
  run_logged cudnn 300 "$WORK/cudnn-tests" --include-ignored --nocapture --test-threads=1
  local rc=$?
  # cuDNN BatchNorm (training forward, backward, running statistics, eval) against candle's
  # CUDA BatchNorm and the CPU path, the synchronized-BatchNorm scope staying off cuDNN, then one
  # WRN-40-2 step with BatchNorm on cuDNN, on candle, and everything on candle.
  if unpack cudnn-bn-tests "$WORK/cudnn-bn-tests"; then
    run_logged cudnn 240 "$WORK/cudnn-bn-tests" --include-ignored --nocapture --test-threads=1
    local bn_rc=$?
    [ "$rc" -eq 0 ] && rc=$bn_rc
  else
    log "error: no $CARRY/cudnn-bn-tests.xz (pack copies the deeprepair-nn cudnn_bn test executable built with --features cudnn): cuDNN BatchNorm not checked"
    [ "$rc" -eq 0 ] && rc=2
  fi
  # The same binary with convolutions and BatchNorm on candle's kernels, convolutions alone on
  # cuDNN, both on cuDNN (strict f32), both with TF32 tensor cores for the convolutions: the
  # rows of each go to their own log, labelled in the table.
  need_bin
  grep -q -a "cudnn-conv2d" "$BIN" \
    || log "this binary has no cuDNN convolutions (built without --features cudnn): the rows will match"
  grep -q -a "cudnn-batch-norm-train" "$BIN" \
    || log "this binary has no cuDNN BatchNorm (built before src/cudnn_bn.rs): cudnn-conv and cudnn rows will match"
  local mode jsd
  : > "$OUT/cudnn-table.txt"
  for mode in candle cudnn-conv cudnn cudnn-tf32; do
    local envs=(DEEPREPAIR_CUDNN=1 DEEPREPAIR_CUDNN_BN=1 DEEPREPAIR_CUDNN_TF32=0)
    [ "$mode" = candle ] && envs=(DEEPREPAIR_CUDNN=0)
    [ "$mode" = cudnn-conv ] && envs=(DEEPREPAIR_CUDNN=1 DEEPREPAIR_CUDNN_BN=0 DEEPREPAIR_CUDNN_TF32=0)
    [ "$mode" = cudnn-tf32 ] && envs=(DEEPREPAIR_CUDNN=1 DEEPREPAIR_CUDNN_BN=1 DEEPREPAIR_CUDNN_TF32=1)
    for jsd in "" "--jsd"; do
      run_logged "cudnn-bench-$mode" 150 env "${envs[@]}" \
        "$BIN" bench train --arch wrn-40-2 --batch 128 $jsd --steps 20 --gpu 0
    done
    grep -E "^(arch|wrn)" "$OUT/cudnn-bench-$mode.log" | awk '!seen[$0]++' \
      | sed "s/^/$(printf '%-11s' "$mode") /" >> "$OUT/cudnn-table.txt"
  done
  grep -E "^test |test result|panicked|WRN-40-2" "$OUT/cudnn.log" > "$OUT/cudnn-summary.txt"
  cat "$OUT/cudnn-summary.txt" "$OUT/cudnn-table.txt"
  return "$rc"
}

cmd_torch() {
  [ -x "$TORCH_PY" ] || die "no $TORCH_PY"
  local script=benchmarks/pytorch_wrn_augmix.py json=$OUT/torch.jsonl
  : > "$json"
  # strict f32 / tf32 / bf16 × {train CE, train JSD, eval@1024}, batch 128 (AugMix's)
  run_logged torch 240 "$TORCH_PY" "$script" --matrix --batch 128 --steps 50 --warmup 10 --out "$json"
  # channels_last (NHWC) where tensor cores like it; a larger batch to show launch-boundness
  run_logged torch 120 "$TORCH_PY" "$script" --bf16 --channels-last --jsd --batch 128 --out "$json"
  run_logged torch 120 "$TORCH_PY" "$script" --tf32 --channels-last --batch 128 --what train --out "$json"
  run_logged torch 120 "$TORCH_PY" "$script" --batch 384 --what train --out "$json"
  "$TORCH_PY" - "$json" <<'EOF' | tee "$OUT/torch-table.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| what | batch | jsd | precision | NHWC | img/s (clean) | img/s (forwarded) | step ms |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    print(f"| {r['what']} | {r['batch']} | {r['jsd']} | {r['precision']} | {r['channels_last']} "
          f"| {r['images_per_second']:,.0f} | {r['forwarded_images_per_second']:,.0f} | {r['step_ms']} |")
if rows:
    print(f"\n{rows[0]['device_name']}, PyTorch {rows[0]['torch_version']}, cuDNN {rows[0]['cudnn_version']}")
EOF
}

cmd_candle() {
  need_bin
  if ! "$BIN" bench train --help 2>&1 | grep -q -- "--gpu"; then
    log "this binary's 'bench train' has no --gpu flag yet (it would train on the CPU): rebuild and pack"
    "$BIN" bench train --help 2>&1 | tee "$OUT/candle.log"
    return 2
  fi
  local arch jsd steps
  for arch in tiny-cnn wrn-40-2; do
    for jsd in "" "--jsd"; do
      steps=20; [ "$arch" = tiny-cnn ] && steps=50
      run_logged candle 150 "$BIN" bench train --arch "$arch" --batch 128 $jsd --steps "$steps" --gpu 0
    done
  done
  run_logged candle 150 "$BIN" bench train --arch wrn-40-2 --batch 384 --steps 10 --gpu 0
  # table rows start with the arch (or the header's "arch"); keep the order, one header
  grep -E "^(arch|tiny-cnn|allconv|densenet|wrn)" "$OUT/candle.log" | awk '!seen[$0]++' > "$OUT/candle-table.txt"
  cat "$OUT/candle-table.txt"
}

cmd_smoke() {
  need_bin
  local data=$CARRY/data/cifar10-jpeg
  [ -d "$data" ] || die "no $data (pack copies a CIFAR-10 JPEG subset there)"
  # The store lives outside the tree and $OUT and persists while the machine stays warm, so a
  # second 'smoke' resumes (finished stages are cached, a running one resumes its checkpoint).
  local store=$WORK/smoke/store.redb
  mkdir -p "$(dirname "$store")"
  run_logged smoke 560 "$BIN" run manifests/smoke.yaml --gpus 0 --data "$data" --store "$store" --plain --json
  local rc=$?
  "$BIN" status --store "$store" > "$OUT/smoke-status.txt" 2>&1 || true
  cat "$OUT/smoke-status.txt"
  return "$rc"
}

# ---- here: gzip what the GPU host needs into gpu-carry/ (builds nothing) -------------------
# Strips a copy of executable SRC into $tmp (the caller's scratch folder) and compresses it to
# $CARRY/NAME.EXT (EXT gz, the default, or xz: under half gzip's size for the test
# executables, which share candle's CUDA kernels, ~20 s each here; that keeps the carry under
# 64 MiB); without SRC, says how to build it (HOW).
# A stale NAME.gz or NAME.xz goes either way (unpack would prefer a stale .gz).
pack_exe() {
  local src=$1 name=$2 how=${3:-} ext=${4:-gz}
  rm -f "$CARRY/$name.gz" "$CARRY/$name.xz"
  if [ -n "$src" ]; then
    cp "$src" "$tmp/$name" && strip "$tmp/$name"
    if [ "$ext" = xz ]; then
      nice xz -9 -T1 -c "$tmp/$name" > "$CARRY/$name.xz"
    else
      gzip -9 -c "$tmp/$name" > "$CARRY/$name.gz"
    fi
  else
    log "no $name executable under $target/release: build it with $how"
  fi
}

# The newest executable matching GLOB that contains the test name MARKER (empty if none).
newest_test_exe() {
  local glob=$1 marker=$2 t
  # shellcheck disable=SC2086 # GLOB is meant to expand
  for t in $(ls -t $glob 2>/dev/null); do
    case $t in *.d|*.rlib|*.rmeta) continue ;; esac
    [ -x "$t" ] && grep -q -a "$marker" "$t" && { echo "$t"; return; }
  done
}

cmd_pack() {
  local target=${TARGET_DIR:-target-cuda} data_src=${DATA_SRC:-../shared/data/cifar10-jpeg}
  local bin=$target/release/deeprepair
  [ -x "$bin" ] || die "no $bin: build it first (benchmarks/README.md)"
  git check-ignore -q "$CARRY/x" || log "warning: $CARRY/ is not git-ignored"
  mkdir -p "$CARRY"
  local tmp; tmp=$(mktemp -d)
  # Stripping a copy drops the debug info (~190 MB → ~50 MB) before gzip -9 (→ ~12 MB).
  pack_exe "$bin" deeprepair
  # The deeprepair-workers test executable built with --features nccl: the newest one that
  # holds the NCCL tests (cargo test --no-run prints its path).
  local tests
  tests=$(newest_test_exe "$target/release/deps/deeprepair_workers-*" two_ranks_on_one_gpu_as_threads)
  pack_exe "$tests" nccl-tests \
    "cargo test --release --features nccl --target-dir $target -p deeprepair-workers --no-run" xz
  # The data-parallel trainer tests built with --features cuda (synchronized BatchNorm on GPU).
  local dp
  dp=$(newest_test_exe "$target/release/deps/data_parallel-*" synchronized_batchnorm_on_a_gpu_matches_one_rank)
  pack_exe "$dp" dp-tests \
    "cargo test --release --features cuda --target-dir $target -p deeprepair-train --test data_parallel --no-run" xz
  # The cuDNN convolution and BatchNorm tests built with --features cudnn (run with
  # --include-ignored).
  local cudnn_tests cudnn_bn_tests
  cudnn_tests=$(newest_test_exe "$target/release/deps/cudnn_conv-*" forward_and_gradients_match_candle_cuda_and_cpu)
  pack_exe "$cudnn_tests" cudnn-tests \
    "cargo test --release --features cudnn --target-dir $target -p deeprepair-nn --test cudnn_conv --no-run" xz
  cudnn_bn_tests=$(newest_test_exe "$target/release/deps/cudnn_bn-*" train_steps_and_eval_match_candle_cuda_and_cpu)
  pack_exe "$cudnn_bn_tests" cudnn-bn-tests \
    "cargo test --release --features cudnn --target-dir $target -p deeprepair-nn --test cudnn_bn --no-run" xz
  # CIFAR-10 JPEG subset for manifests/smoke.yaml (per_class 300 train, 100 test): the first
  # N files of each class folder, same layout.
  if [ -d "$data_src" ]; then
    rm -rf "$CARRY/data/cifar10-jpeg"
    local split n cls
    for split in train test; do
      n=300; [ "$split" = test ] && n=100
      for cls in "$data_src/$split"/*/; do
        cls=$(basename "$cls")
        mkdir -p "$CARRY/data/cifar10-jpeg/$split/$cls"
        ls "$data_src/$split/$cls" | sort | head -n "$n" \
          | sed "s|^|$data_src/$split/$cls/|" | xargs cp -t "$CARRY/data/cifar10-jpeg/$split/$cls/"
      done
    done
  else
    log "no $data_src: smoke will have no data"
  fi
  {
    echo "packed $(date -u +%FT%TZ) from $(git rev-parse --short HEAD)$(git diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
    echo "deeprepair: built $(date -u -r "$bin" +%FT%TZ), sha256 $(gunzip -c "$CARRY/deeprepair.gz" | sha256sum | cut -c1-16) (stripped)"
    [ -n "$tests" ] && echo "nccl-tests: $(basename "$tests"), built $(date -u -r "$tests" +%FT%TZ)"
    [ -n "$dp" ] && echo "dp-tests: $(basename "$dp"), built $(date -u -r "$dp" +%FT%TZ)"
    [ -n "$cudnn_tests" ] && echo "cudnn-tests: $(basename "$cudnn_tests"), built $(date -u -r "$cudnn_tests" +%FT%TZ)"
    [ -n "$cudnn_bn_tests" ] && echo "cudnn-bn-tests: $(basename "$cudnn_bn_tests"), built $(date -u -r "$cudnn_bn_tests" +%FT%TZ)"
  } > "$CARRY/MANIFEST.txt"
  rm -rf "$tmp"
  echo "== $CARRY/"
  du -b "$CARRY"/*.gz "$CARRY"/*.xz 2>/dev/null | awk '{printf "%8.1f MiB  %s\n", $1/1048576, $2}'
  [ -d "$CARRY/data" ] && printf "%8.1f MiB  %s (%s files)\n" \
    "$(du -sb "$CARRY/data" | awk '{print $1/1048576}')" "$CARRY/data" "$(find "$CARRY/data" -type f | wc -l)"
  local total; total=$(du -sb "$CARRY" | awk '{print $1}')
  printf "%8.1f MiB  total (the run tool carries at most 64 MiB)\n" "$(awk -v t="$total" 'BEGIN{print t/1048576}')"
  [ "$total" -le $((64 * 1024 * 1024)) ] || { log "over the 64 MiB carry limit"; return 1; }
  cat "$CARRY/MANIFEST.txt"
}

usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

case ${1:-} in
  env) cmd_env ;;
  nccl) cmd_nccl ;;
  torch) cmd_torch ;;
  candle) cmd_candle ;;
  cudnn) cmd_cudnn ;;
  smoke) cmd_smoke ;;
  pack) cmd_pack ;;
  -h|--help|help|"") usage ;;
  *) usage; die "unknown subcommand '$1'" ;;
esac
