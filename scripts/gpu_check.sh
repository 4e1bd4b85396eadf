#!/usr/bin/env bash
# Check correctness and time SD 1.5 (512x512, 50 steps, fp16) on an NVIDIA GPU against diffusers fp16:
# CUDA EP with and without a CUDA graph, and TensorRT EP where installed. Needs: this project installed, and
# onnxruntime-gpu in place of onnxruntime (pip uninstall -y onnxruntime && pip install onnxruntime-gpu).
# Usage: bash scripts/gpu_check.sh [--out DIR] [--json FILE] [--runs N]   (see scripts/gpu_check.py --help)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || { echo "no NVIDIA GPU found"; exit 1; }
export HF_HUB_OFFLINE=1
exec python scripts/gpu_check.py "$@"
