#!/usr/bin/env bash
# The checks that need a GPU, as one command for a machine that has one (CI has none):
#
#     bash tools/gpu_check.sh [OUT_DIR]        # PYTHON=... to choose the interpreter (default python3)
#
# 1. tests/test_cuda.py and the CPU tests of the same fixtures: every stage and generation case in fp32 on the
#    GPU against the reference, fp16 / bf16 logits and every generation mode on the GPU;
# 2. the benchmark at the quarter shape (every width of blip2-opt-2.7b, a quarter of its depth) with
#    --device cuda: fp32, bf16 and fp16, ours against transformers, each stage's ratio -> OUT_DIR/RESULTS-quarter.md.
# Needs a CUDA build of torch, transformers and accelerate (pip install -r tests/reference/requirements.txt
# accelerate). Exit status: the number of failed steps.
set -u
cd "$(dirname "$0")/.." || exit 2
python=${PYTHON:-python3}
out=${1:-.}
failed=0
"$python" -c "import sys, torch
sys.exit('gpu_check: no CUDA device here; run it on a machine with a GPU') if not torch.cuda.is_available() else None
print('torch', torch.__version__, 'on', torch.cuda.get_device_name())" || exit 1
"$python" -m pytest -q -rs tests/test_cuda.py tests/test_model.py tests/test_generate.py || failed=$((failed + 1))
"$python" benchmarks/bench.py --device cuda --shape quarter || failed=$((failed + 1))
cp benchmarks/RESULTS-quarter.md "$out/" 2>/dev/null
exit "$failed"
