#!/usr/bin/env bash
# The GPU benchmarks and the compiled-kernel suite, in stages of at most a few minutes each, each
# writing a handful of files. Runs from the source tree (PYTHONPATH=.), installs nothing but the carried
# wheels (.whl, made here by benchmarks/gpu_wheels.sh) into /tmp/site.
#
#   bash benchmarks/gpu_session.sh STAGE [STAGE ...]      stages: env tests mask optimizer memory kernels
#
# Results go to $OUT or benchmarks/results/gpu-<date>/. The usual order:
#   1. bash benchmarks/gpu_session.sh env tests        compiled-kernel suite incl. the gpu-marked tests
#   2. bash benchmarks/gpu_session.sh mask             7B mask generation, 50M side by side with the
#                                                      reference procedure, block/warps sweep
#   3. bash benchmarks/gpu_session.sh optimizer memory masked AdamW at 7B; 7B attribution + NPO step
# Kernel timings (mask, optimizer, kernels) come from the pytest-benchmark suite
# (benchmarks/test_kernels_bench.py, pytest-benchmark JSON); the block/warps sweep and the memory
# stage use bench_mask.py --sweep and bench_memory.py.
# Set SMOKE=1 to run the same stages on tiny shapes (CPU: Triton interpreter); the test suite does.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results/gpu-$(date -u +%F)}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
SMOKE="${SMOKE:-0}"
BUDGET="${BUDGET:-570}"  # seconds for this whole invocation (stages stop starting work after it)
DEADLINE=$(( $(date +%s) + BUDGET ))
if [ "$SMOKE" = 1 ]; then
  export TRITON_INTERPRET=1
  SHAPES=llama2-tiny; SMALL=llama2-tiny; ARCH=tiny; DEVICE=(--device cpu); INTERP=(--interpreter --repeats 1)
  SWEEP=(--sweep --sweep-limit 2 --repeats 0)
else
  unset TRITON_INTERPRET
  SHAPES=llama2-7b; SMALL=llama2-50m; ARCH=llama2-7b; DEVICE=(); INTERP=(); SWEEP=(--sweep --repeats 2)
fi

install_wheels() {
  [ -n "${WAGLE_WHEELS_DONE:-}" ] || [ "$SMOKE" = 1 ] && return 0  # the smoke run uses this machine's
  export WAGLE_WHEELS_DONE=1
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no carried wheels (.whl): tests needing datasets/rouge-score fail if the machine lacks them"
    return 0
  fi
  local wheels=(.whl/*.whl)
  if ! "$PY" -c "import sys, pyarrow; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" 2>/dev/null; then
    wheels+=(.whl/pyarrow/*.whl)  # datasets 5.2 needs pyarrow >= 24
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${wheels[@]}" && export PYTHONPATH="/tmp/site:$PYTHONPATH"
}

run_stage() {  # run_stage NAME COMMAND...: output tee'd to $OUT_DIR/NAME.log, stopped at the deadline
  local name="$1"; shift
  local left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt 20 ]; then
    echo "== $name: SKIPPED, ${left}s left of BUDGET=$BUDGET: $*" | tee -a "$OUT_DIR/$name.log"
    return 1
  fi
  echo "== $name (${left}s left): $*" | tee -a "$OUT_DIR/$name.log"
  timeout "$left" "$@" 2>&1 | tee -a "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc" | tee -a "$OUT_DIR/$name.log"
  return "$rc"
}

stage_env() {
  {
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv \
      2>&1 || echo "nvidia-smi: not available"
    "$PY" - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "| SMs", p.multi_processor_count, "| memory GiB", round(p.total_memory / 2**30, 1))
for name in ("triton", "transformers", "datasets", "pyarrow", "rouge_score", "scipy", "safetensors",
             "tokenizers", "accelerate", "pytest", "xdist"):
    try:
        module = importlib.import_module(name)
        print(f"{name:<13} {getattr(module, '__version__', 'ok')}")
    except Exception as exc:
        print(f"{name:<13} MISSING: {type(exc).__name__}: {exc}")
EOF
  } 2>&1 | tee "$OUT_DIR/env.txt"
}

stage_tests() {
  local workers=8
  [ "$SMOKE" = 1 ] && workers=2
  run_stage tests "$PY" -m pytest -q -rfEs -n "$workers" -p no:cacheprovider tests
}

bench_suite() {  # bench_suite STAGE SHAPES RATIOS JSON -k EXPR: the pytest-benchmark suite
  local name="$1" shapes="$2" ratios="$3" json="$4"; shift 4
  PYTEST_XDIST_WORKER= WAGLE_BENCH_SHAPES="$shapes" WAGLE_BENCH_RATIOS="$ratios" run_stage "$name" "$PY" -m pytest -q -p no:xdist \
    -p no:cacheprovider benchmarks/test_kernels_bench.py --benchmark-only --benchmark-json "$json" "$@"
}

stage_mask() {
  bench_suite mask "$SHAPES" 0.1,0.5,0.95 "$OUT_DIR/mask-$SHAPES.json" \
    -k "test_mask and not adamw and bf16 and not reference"
  bench_suite mask "$SMALL" 0.5 "$OUT_DIR/mask-$SMALL-vs-reference.json" -k "test_mask and not adamw and bf16"
  run_stage mask "$PY" benchmarks/bench_mask.py --shapes "$SHAPES" --methods triton "${DEVICE[@]}" \
    "${INTERP[@]}" "${SWEEP[@]}" --out "$OUT_DIR/mask-$SHAPES-sweep.json"
}

stage_optimizer() {
  bench_suite optimizer "$SHAPES" 0.1,0.5,0.95 "$OUT_DIR/optimizer-$SHAPES.json" \
    -k "test_masked_adamw_step and bf16"
}

stage_kernels() {  # the pytest-benchmark suite: kernels vs torch path vs reference, bytes model attached
  local shapes=llama2-7b-layer
  [ "$SMOKE" = 1 ] && shapes=llama2-tiny
  PYTEST_XDIST_WORKER= WAGLE_BENCH_SHAPES="$shapes" run_stage kernels "$PY" -m pytest -q -p no:xdist -p no:cacheprovider benchmarks \
    --benchmark-only --benchmark-json "$OUT_DIR/kernels-$shapes.json"
}

stage_memory() {
  run_stage memory "$PY" benchmarks/bench_memory.py --arch "$ARCH" "${DEVICE[@]}" \
    --out "$OUT_DIR/memory-$ARCH.json"
}

[ $# -gt 0 ] || { sed -n '2,14p' "$0"; exit 2; }
install_wheels
status=0
for stage in "$@"; do
  case "$stage" in
    env|tests|mask|optimizer|memory|kernels) "stage_$stage" || status=1 ;;
    *) echo "unknown stage: $stage (env tests mask optimizer memory kernels)" >&2; exit 2 ;;
  esac
done
echo "results in $OUT_DIR:"; ls -la "$OUT_DIR"
exit "$status"
