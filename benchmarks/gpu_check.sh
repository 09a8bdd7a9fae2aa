#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (see benchmarks/README.md):
# the CUDA-marked tests, the whole test suite with CUDA visible, and single-GPU
# runs of each engine. Output goes to ${OUT:-gpu-check}/log.
# Each step has its own time limit so that one hang cannot eat the lease.
set -u
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
exec > >(tee "$OUT/log") 2>&1
export PYTHONUNBUFFERED=1
step() { echo; echo "=== $* ($(date +%T))"; }

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), torch.cuda.get_device_name())"
nproc

step install
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1

step "CUDA-marked tests"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests -o addopts=-ra


step "memory accounting against the allocator"
timeout 90 python3 benchmarks/memory_accuracy.py

step "speedup on one GPU shared by K=2 modules"
timeout ${SPEED_S:-120} python3 benchmarks/speedup.py --model resnet56 --k 2 --rounds 1 --methods bp,fr,ddg,ddp \
  --devices cuda:0,cuda:0 --split blocks --root /tmp/gpu-speedup

step "whole suite with CUDA visible (14 workers; CUDA hidden from the tests not marked gpu)"
timeout ${SUITE_S:-240} python3 -m pytest -v -n 14 -p no:cacheprovider tests -o addopts=-ra --durations=5 | grep -v "PASSED\|PytestBenchmarkWarning\|warner("
step done
