#!/usr/bin/env bash
# The checks CPU tests cannot make (bf16/fp16 calibration on CUDA, a model split over two devices, 4-bit on CUDA, a
# short DeepSpeed run), in under 10 minutes on one GPU. Exits 0 with a message when no CUDA device is visible.
#   bash bench/gpu_check.sh                 # all checks; JSON to $OUT/gpu_check.json or bench/results/gpu_check.json
#   bash bench/gpu_check.sh --skip deepspeed
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/peft/src${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec timeout 570 python bench/gpu_check.py "$@"
