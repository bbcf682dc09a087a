#!/usr/bin/env bash
# The GPU protocol, in one run on a machine with an NVIDIA GPU and the bench extra installed
# (pip install -e ".[bench,test]" plus jax[cuda12]); each table records jax.devices().
#   bash bench/gpu_protocol.sh [output folder]      (default: bench/results/gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results/gpu}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/device.txt" || true
# Dense QP hypergradients, a batch of 1024 upper-level points (vmap), against qpax.
python bench/qp_hypergrad.py --device gpu --dy 200 --batch 1024 --dtype float64 float32 \
    --out "$out/qp_hypergrad_batch1024.txt"
# The box lower level at 1e6, 4e6, 1.6e7 variables, against jaxopt's ProjectedGradient.
python bench/box_qp.py --device gpu --sizes 1000000 4000000 16000000 --float32 \
    --out "$out/box_qp.txt"
# The sparse QP at 1e5 and 1e6 against MPAX (Clarabel runs on the host CPU).
python bench/sparse_qp.py --device gpu --sizes 100000 1000000 --float32 --cvxpylayers-max 0 \
    --admm-max 0 --out "$out/sparse_qp.txt"
