#!/usr/bin/env bash
# One command for a lent GPU (issue 6): compiled-kernel test suite + benchmarks, results under $OUT
# (or benchmarks/results/). Runs from the source tree: PYTHONPATH=. , no install needed.
#   bash benchmarks/gpu_session.sh [quick|full]
set -uo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-full}"
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT_DIR/gpu.txt"
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT_DIR/gpu.txt"
python -m pytest -q -x -p no:cacheprovider tests 2>&1 | tail -40 | tee "$OUT_DIR/gpu-tests.txt"
if [ "$MODE" = "full" ]; then
  python benchmarks/bench_mask.py --shapes llama2-7b --out "$OUT_DIR/mask-llama2-7b.json" 2>&1 | tee "$OUT_DIR/mask-llama2-7b.txt"
  for r in 0.1 0.5 0.95; do
    python benchmarks/bench_mask.py --shapes llama2-7b --ratio "$r" --methods triton --out "$OUT_DIR/mask-llama2-7b-r$r.json" 2>&1 | tail -3
  done
  python benchmarks/bench_optimizer.py --shapes llama2-7b --out "$OUT_DIR/optimizer-llama2-7b.json" 2>&1 | tee "$OUT_DIR/optimizer-llama2-7b.txt"
  python benchmarks/bench_memory.py --arch llama2-7b --out "$OUT_DIR/memory-llama2-7b.json" 2>&1 | tee "$OUT_DIR/memory-llama2-7b.txt"
fi
