#!/usr/bin/env bash
# The GPU checks in one go, on a machine with one CUDA GPU (about 5 minutes):
# the CUDA tests (`pytest -m cuda`), then every [cuda] benchmark row (`run.py --only gpu`).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # from the checkout's root; results in OUT_DIR (default gpu-results/)
#
# Only the test files that hold CUDA tests are collected, so the optional extras
# (transformers, lightning, matplotlib) need not be installed on the GPU machine.
set -u
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else None)' | tee "$out/device.txt"
status=0
files=$(grep -l "mark.cuda" tests/*.py)
python -m pytest -m cuda -q -p no:cacheprovider $files 2>&1 | tee "$out/cuda-tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
python benchmarks/run.py --only gpu --out "$out/gpu-bench.md" 2>&1 | tee "$out/gpu-bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
