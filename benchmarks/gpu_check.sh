#!/usr/bin/env bash
# The checks for a lent GPU machine, as one script (see benchmarks/README.md):
# the CUDA-marked tests, the runner's overhead on CUDA, the time breakdown of
# the decoupled methods with K=2 modules sharing the GPU, the data path's share
# of a GPU epoch; and before them, on a machine with nothing else running,
# what two and four cores computing at once cost each other (contention.py),
# and the K=2 speedup on the CPU with one core per module (each run confined to
# two physical cores with taskset, CPU_RUNS runs side by side).
# STEPS picks the steps (default: all of them, in this order):
#   contention speedup tests overhead breakdown data projection
# projection (issue 28): traces on the GPU (local engine, every module on cuda:0, CUDA events) of
# ResNet-110 and gpt-small at K = 1, 2, 4, 8; the projected K = 1 seconds against the same run untraced
# (the one check one GPU allows); K = 2/4/8 projected on NVLink 4.
# Output goes to ${OUT:-gpu-check}/. Each step has its own time limit so that
# one hang cannot eat the lease.
set -u
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
exec > >(tee "$OUT/log") 2>&1
export PYTHONUNBUFFERED=1
STEPS=${STEPS:-contention speedup tests overhead breakdown data projection}
step() { echo; echo "=== $* ($(date +%T))"; }
wanted() { [[ " $STEPS " == *" $1 "* ]]; }

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core|Socket"

step install
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1

# One CPU per physical core. The first GPU_CORES cores run the GPU work; the next
# 2 * CPU_RUNS are paired up for the CPU steps; the rest stay idle.
GPU_CORES=${GPU_CORES:-6}; CPU_RUNS=${CPU_RUNS:-4}
read -r -a SETS <<<"$(python3 - "$GPU_CORES" "$CPU_RUNS" <<'EOF'
import glob, sys
gpu_cores, runs = int(sys.argv[1]), int(sys.argv[2])
cores = {}
for path in sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*/topology/thread_siblings_list"),
                   key=lambda p: int(p.split("/cpu")[2].split("/")[0])):
    cpu = int(path.split("/cpu")[2].split("/")[0])
    cores.setdefault(open(path).read().strip(), []).append(cpu)
first = [cpus[0] for cpus in cores.values()]  # one CPU of each physical core: siblings stay idle
gpu = first[:gpu_cores]
pairs = [first[gpu_cores + 2 * i: gpu_cores + 2 * i + 2] for i in range(runs)]
pairs = [p for p in pairs if len(p) == 2]
print(",".join(map(str, gpu)), *(",".join(map(str, p)) for p in pairs))
EOF
)"
GPU_SET=${SETS[0]}; PAIRS=("${SETS[@]:1}")
echo "GPU work on CPUs $GPU_SET; CPU steps on ${PAIRS[*]} (one physical core per module)"

# The CPU steps run first, before the GPU work, so that no core of the machine is busy but theirs.
if wanted contention; then
step "contention: 2 and 4 cores computing at once against one alone"
QUAD=$(IFS=,; echo "${PAIRS[*]:0:2}")
CUDA_VISIBLE_DEVICES= timeout 120 taskset -c "${PAIRS[0]}" python3 benchmarks/contention.py --model resnet20 --k 2 \
  --rounds 3 | tee "$OUT/contention.md"
CUDA_VISIBLE_DEVICES= timeout 120 taskset -c "$QUAD" python3 benchmarks/contention.py --model resnet20 --k 4 \
  --rounds 3 | tee -a "$OUT/contention.md"
fi

if wanted speedup; then
step "K=2 speedup on the CPU, ${#PAIRS[@]} runs side by side"
i=0; CPU_PIDS=()
for pair in "${PAIRS[@]}"; do
  i=$((i + 1))
  CUDA_VISIBLE_DEVICES= timeout ${CPU_S:-330} taskset -c "$pair" python3 benchmarks/speedup.py --model ${SPEEDUP_MODEL:-resnet20} --k 2 \
    --rounds 1 --methods ${CPU_METHODS:-bp,fr,ddg,ddp} --root /tmp/speedup-cpu-$i > /tmp/speedup-cpu-$i.md 2>&1 &
  CPU_PIDS+=($!)
done
# Their PIDs, not a bare `wait`: that would also wait for the `tee` of this script's own output.
wait "${CPU_PIDS[@]}"
for f in /tmp/speedup-cpu-*.md; do echo "--- $f"; cat "$f"; done | tee "$OUT/speedup-cpu.md"
# Each finished run's own figure, for a table cut short by the time limit.
grep -o '"samples_per_s": [0-9.]*' /tmp/speedup-cpu-*/*/*/summary.json | tee -a "$OUT/speedup-cpu.md"
fi

if wanted tests; then
step "CUDA-marked tests"
timeout ${TESTS_S:-150} taskset -c "$GPU_SET" python3 -m pytest -q -m gpu -p no:cacheprovider tests -o addopts=-ra
fi

if wanted overhead; then
step "runner overhead on CUDA"
MODELS=""; for m in ${OVERHEAD_MODELS:-resnet20 resnet56 resnet110}; do MODELS="$MODELS --model $m"; done
timeout ${OVERHEAD_S:-150} taskset -c "$GPU_SET" python3 benchmarks/overhead.py --device cuda $MODELS \
  --rounds ${OVERHEAD_ROUNDS:-7} --steps 5 | tee "$OUT/overhead-cuda.md"
fi

if wanted breakdown; then
step "time breakdown, K=2 modules sharing the GPU"
timeout ${BREAKDOWN_S:-150} taskset -c "$GPU_SET" python3 benchmarks/breakdown.py --model resnet56 --k 2 \
  --methods fr,ddg,fdg,dgl --device cuda:0 --root /tmp/gpu-breakdown | tee "$OUT/breakdown-gpu.md"
fi

if wanted data; then
step "data path's share of a GPU step"
timeout ${DATA_S:-90} taskset -c "$GPU_SET" python3 benchmarks/data_path.py --device cuda --workers 0,4 \
  --samples 20000 --rounds 2 --steps 40 | tee "$OUT/data-path-gpu.md"
fi
if wanted projection; then
step "projection: traces on the GPU, K = 1 projected against measured, K = 2/4/8 on NVLink"
P=/tmp/gpu-projection; rm -rf "$P"
for spec in "resnet110 synthetic 128" "gpt-small synthetic-text 16 --context 256"; do
  read -r model data batch extra <<<"$spec"
  common=(--model "$model" --dataset "$data" --batch-size "$batch" --epochs 1 --sigma-every 0 --engine local --quiet
          --split blocks $extra)
  timeout ${PROJ_S:-100} taskset -c "$GPU_SET" dbench run --method bp --gpus 1 --devices cuda:0 "${common[@]}" \
    --out "$P/$model-k1-untraced"
  timeout ${PROJ_S:-100} taskset -c "$GPU_SET" dbench run --method bp --gpus 1 --devices cuda:0 "${common[@]}" \
    --trace --out "$P/$model-k1"
  for k in 2 4 8; do
    devs=$(python3 -c "print(','.join(['cuda:0'] * $k))")
    for method in ${PROJ_METHODS:-bp ddg}; do
      timeout ${PROJ_S:-100} taskset -c "$GPU_SET" dbench run --method $method --gpus $k --devices "$devs" \
        "${common[@]}" --trace --out "$P/$model-k$k-$method"
    done
  done
  python3 - "$P" "$model" <<'EOF2' | tee -a "$OUT/projection-gpu.md"
import json, sys
from pathlib import Path
from dbench import projection
root, model = Path(sys.argv[1]), sys.argv[2]
nv = projection.link("nvlink4")
measured = json.loads((root / f"{model}-k1-untraced" / "summary.json").read_text())["train_seconds"]
one = projection.load(root / f"{model}-k1", nv).projection.seconds
print(f"{model}: K=1 projected {one:.2f} s against measured {measured:.2f} s untraced ({one / measured - 1:+.1%})")
EOF2
done
for k in 2 4 8; do dbench project "$P"/*-k$k-* --link nvlink4 --device-memory 80 | tee -a "$OUT/projection-gpu.md"; done
# The one-device traces laid out on 8 replicas (ddp x8 at 8 times the batch).
dbench project "$P"/resnet110-k1 "$P"/gpt-small-k1 --devices 8 --link nvlink4 | tee -a "$OUT/projection-gpu.md"
fi
step done
