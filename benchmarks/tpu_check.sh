#!/usr/bin/env bash
# One command for a TPU VM (issue 12): versions, the Mosaic kernel tests compiled on the TPU (no
# interpreter), the kernels compiled ahead of time for v4 / v5e / v5p / v6e, the long-conv block
# (Mosaic kernel vs XLA Monarch vs XLA FFT, against the costs docs/perf.md expects), and forward
# tokens/s of M2-BERT-base vs the Transformer baseline at L = 512..32768. Results under $OUT
# (default ./out): tpu_check.log, kernel_tests.log, tpu_aot_check.json, tpu_block_bf16.json,
# tpu_block_f32.json, forward.json, tpu_check.json (stage exit codes).
#
#   bash benchmarks/tpu_check.sh             # on a TPU VM, about 15 minutes
#   bash benchmarks/tpu_check.sh --dry_run   # anywhere: every stage at toy size, kernels interpreted
#
# TPU_CHECK_STAGES (comma list, default all) picks stages: kernel_tests, aot_compile, block,
# forward (tests/test_tpu_check.py runs the dry run without `forward`, which
# tests/test_kernels_benchmark.py covers).
#
# Each stage has its own time limit, and the benchmarks write their JSON after every row, so a
# stage cut short keeps what it measured and the script still ends.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
[[ "${1:-}" == "--dry_run" ]] && DRY_RUN=1
OUT="${OUT:-./out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
if (( DRY_RUN )); then
  export JAX_PLATFORMS=cpu M2JAX_PALLAS_INTERPRET=1
else
  export JAX_PLATFORMS=tpu            # tests/conftest.py defaults to cpu otherwise
  export M2JAX_PALLAS_INTERPRET=0     # the real Mosaic kernels
fi
start=$(date +%s)
log() { echo "[tpu_check +$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/tpu_check.log"; }
STAGES=",${TPU_CHECK_STAGES:-kernel_tests,aot_compile,block,forward},"
want() { [[ "$STAGES" == *",$1,"* ]]; }
declare -A RC
stage() {  # stage NAME LIMIT_S LOGFILE CMD...: run with a time limit, record the exit code
  local name=$1 limit=$2 logfile=$3; shift 3
  log "$name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$logfile" 2>&1
  RC[$name]=$?
  tail -n 25 "$OUT/$logfile"
  log "$name exit code: ${RC[$name]}"
}

log "versions and devices (dry run: $DRY_RUN)"
{
  $PY --version
  $PY -c "import jax, jaxlib, flax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__); print(jax.devices())"
  $PY -c "import libtpu, importlib.metadata as m; print('libtpu', m.version('libtpu'))" 2>&1 || true
} 2>&1 | tee -a "$OUT/tpu_check.log"

if want kernel_tests; then
  if (( DRY_RUN )); then
    stage kernel_tests 300 kernel_tests.log $PY -m pytest -q -p no:cacheprovider -o addopts="" \
      tests/kernels/test_pallas_mosaic_tpu.py -k "test_real_kernels_lower_for_tpu and 128"
  else
    stage kernel_tests 400 kernel_tests.log $PY -m pytest -q -p no:cacheprovider -o addopts="" \
      tests/kernels/test_pallas_mosaic_tpu.py tests/kernels/test_api.py tests/test_tpu_lowering.py
  fi
fi

if want aot_compile; then
  if ! $PY -c "import libtpu" 2>/dev/null; then
    log "aot_compile skipped: libtpu is not installed"
  elif (( DRY_RUN )); then
    stage aot_compile 300 aot.log $PY benchmarks/tpu_aot_check.py --chips v5e --seq_lens 128 \
      --dtypes bfloat16 --json "$OUT/tpu_aot_check.json"
  else
    stage aot_compile 300 aot.log $PY benchmarks/tpu_aot_check.py --chips v4,v5e,v5p,v6e \
      --seq_lens 128,512,1024,8192,32768 --json "$OUT/tpu_aot_check.json"
  fi
fi

if want block; then
  if (( DRY_RUN )); then
    stage block 300 block.log $PY benchmarks/tpu_block.py --seq_lens 128,1024 --hidden 8 \
      --tokens_per_step 256 --passes forward --warmup 1 --repeats 1 --out "$OUT" \
      --json_name tpu_block_bf16.json
  else
    stage block_bf16 240 block_bf16.log $PY benchmarks/tpu_block.py --dtype bfloat16 \
      --seq_lens 512,1024,2048,4096,8192,16384,32768 --out "$OUT" --json_name tpu_block_bf16.json
    stage block_f32 150 block_f32.log $PY benchmarks/tpu_block.py --dtype float32 \
      --seq_lens 512,2048,8192 --out "$OUT" --json_name tpu_block_f32.json
  fi
fi

if want forward; then
  if (( DRY_RUN )); then
    stage forward 300 forward.log $PY launch/benchmark.py --smoke --benchmarks=forward \
      --out_dir="$OUT" --json_name=forward.json
  else
    stage forward 300 forward.log $PY launch/benchmark.py --benchmarks=forward --dtype=bfloat16 \
      --seq_lens=512,1024,2048,4096,8192,16384,32768 --tokens_per_step=65536 --repeats=5 \
      --transformer_max_len=8192 --out_dir="$OUT" --json_name=forward.json
  fi
fi

codes=""
for k in "${!RC[@]}"; do codes+="\"$k\": ${RC[$k]}, "; done
echo "{${codes%, }}" > "$OUT/tpu_check.json"
log "stage exit codes: $(cat "$OUT/tpu_check.json") (tables above; rows in $OUT/*.json)"
for k in "${!RC[@]}"; do (( RC[$k] == 0 )) || exit 1; done
