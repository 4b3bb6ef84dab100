#!/usr/bin/env bash
# The GPU checks, in one run: the GPU tests, the in-process ComfyUI sampling suites on the GPU,
# and bench/overhead.py on a full-size SD1.5 UNet in fp16. Each step's log goes to OUT; a step
# that fails does not stop the next one; the exit status is the number of failed steps.
#
#   COMFYUI_PATH=/path/to/ComfyUI bash bench/gpu_check.sh [OUT]
#
# The python that runs it needs torch with CUDA, numpy, safetensors, pytest and ComfyUI's
# requirements (PYTHON, default python3). BUDGET (seconds, default 530) caps the whole run: each
# step gets at most its own limit and what is left of the budget, most important first.
set -uo pipefail
out=${1:-gpu-check}
py=${PYTHON:-python3}
mkdir -p "$out"
: "${COMFYUI_PATH:?set COMFYUI_PATH to a ComfyUI checkout}"
export COMFYUI_PATH MOE_SAMPLER_DEVICE=cuda PYTHONUNBUFFERED=1
failed=0

budget=${BUDGET:-530}

step() {  # step NAME LIMIT COMMAND...: run, log to OUT/NAME.log, count a failure
  local name=$1 limit=$2
  shift 2
  local left=$((budget - SECONDS - 5))
  if [ "$left" -lt 30 ]; then echo "== $name: not run, the budget is spent"; failed=$((failed + 1)); return; fi
  [ "$limit" -le "$left" ] || limit=$left
  local start=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  echo "== $name: exit $rc in $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' \
  >> "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

step gpu_tests 150 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_comfy.py tests/test_packaging.py -rs
step overhead 240 "$py" bench/overhead.py --device cuda --fp16 --sd15-size --reps "${REPS:-8}"
# the learning loop on the GPU; -s prints the run times with and without a background update
step online 120 "$py" -m pytest -q -p no:cacheprovider -s -rs tests/test_comfy_online.py
grep -h "run_adaptive median" "$out/online.log"
step sampling 200 "$py" -m pytest -q -p no:cacheprovider -rs \
  tests/test_comfy_sampling.py tests/test_comfy_stop_rule.py tests/test_comfy_latent_shape.py
echo "failed steps: $failed"
exit "$failed"
