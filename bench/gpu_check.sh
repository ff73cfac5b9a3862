#!/usr/bin/env bash
# GPU evidence in one run (at most ~8 minutes on one CUDA GPU): the tests that touch CUDA paths,
# bench/train_step.py on CUDA (the fp32 default against amp=bf16, and bf16 + dueb.fuse_passes) and
# bench/eval.py on CUDA. Everything goes to one file: $OUT/gpu_check.txt when $OUT is set (the device tool),
# else bench/gpu_check_results.txt.
#
#     bash bench/gpu_check.sh            # from the repository root, torch with CUDA installed
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
RES=${OUT:+$OUT/gpu_check.txt}
RES=${RES:-bench/gpu_check_results.txt}
: > "$RES"
export PYTHONUNBUFFERED=1
log() { echo "$@" | tee -a "$RES"; }
section() {  # section <title> <timeout s> <command...>: run with a time limit, keep going
    local title=$1 limit=$2; shift 2
    log "== $title ($(date -u +%H:%M:%S), limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$RES"
    local rc=${PIPESTATUS[0]}
    log "== $title: exit $rc after $((SECONDS - t0)) s"
    return "$rc"
}

log "gpu_check $(git rev-parse --short HEAD 2>/dev/null) $(date -u +%Y-%m-%dT%H:%M:%SZ)"
section "environment" 60 "$PY" -c "
import torch, platform
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)
assert torch.cuda.is_available(), 'no CUDA device visible: nothing to check here'
print('device', torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())
" || exit 1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader | tee -a "$RES"

# Tests that run on CUDA when it is present (device parametrisations, AMP resolution, GPU
# device parsing, the end-to-end train/eval runs pick GPU 0 by default).
section "pytest (CUDA paths)" 180 "$PY" -m pytest -q -x tests/test_losses_props.py \
    tests/test_eval_sliding.py tests/test_eval_cli.py tests/test_train.py
section "bench/train_step.py (CUDA: fp32 faithful default against bf16, bf16 + dueb.fuse_passes)" 180 "$PY" \
    bench/train_step.py --device cuda --configs resnet50:256 resnet50:512 --repeat 5
section "bench/eval.py (CUDA, ResNet-50, 512x1024, crop 512)" 90 "$PY" bench/eval.py \
    --device cuda --reps 5
log "results in $RES"
