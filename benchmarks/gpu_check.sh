#!/usr/bin/env bash
# The checks for a lent GPU machine, as one script (see benchmarks/README.md):
# the CUDA-marked tests, the runner's overhead on CUDA, the time breakdown of
# the decoupled methods with K=2 modules sharing the GPU, and, on CPU cores
# the GPU work does not use, the runner's overhead on the CPU (a quiet machine:
# one torch thread per process, each process pinned to a physical core of its own).
# Output goes to ${OUT:-gpu-check}/. Each step has its own time limit so that
# one hang cannot eat the lease.
set -u
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
exec > >(tee "$OUT/log") 2>&1
export PYTHONUNBUFFERED=1
step() { echo; echo "=== $* ($(date +%T))"; }

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core|Socket"

step install
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1

# One CPU per physical core, the last three for the CPU overhead runs; everything else runs on the rest.
read -r -a FREE <<<"$(python3 - <<'EOF'
import glob
cores = {}
for path in sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*/topology/thread_siblings_list"),
                   key=lambda p: int(p.split("/cpu")[2].split("/")[0])):
    cpu = int(path.split("/cpu")[2].split("/")[0])
    cores.setdefault(open(path).read().strip(), []).append(cpu)
quiet = [cpus for cpus in cores.values()][-3:]
rest = sorted(c for cpus in cores.values() if cpus not in quiet for c in cpus)
print(",".join(str(c[0]) for c in quiet), ",".join(map(str, rest)))
EOF
)"
QUIET=${FREE[0]}; REST=${FREE[1]}
echo "CPU overhead pinned to CPUs $QUIET (one per physical core, siblings left idle); other work on $REST"

step "runner overhead on the CPU (background, pinned)"
i=0
for spec in "resnet20 9 3" "resnet56 9 3" "resnet110 7 2"; do
  set -- $spec; i=$((i + 1)); cpu=$(echo "$QUIET" | cut -d, -f$i)
  OMP_NUM_THREADS=1 timeout ${CPU_S:-420} taskset -c "$cpu" python3 benchmarks/overhead.py --device cpu \
    --threads 1 --model "$1" --rounds "$2" --steps "$3" > "$OUT/overhead-cpu-$1.md" 2>&1 &
done

step "CUDA-marked tests"
timeout 150 taskset -c "$REST" python3 -m pytest -q -m gpu -p no:cacheprovider tests -o addopts=-ra

step "runner overhead on CUDA"
timeout 90 taskset -c "$REST" python3 benchmarks/overhead.py --device cuda --model resnet20 --model resnet56 \
  --model resnet110 --rounds 9 --steps 5 | tee "$OUT/overhead-cuda.md"

step "time breakdown, K=2 modules sharing the GPU"
timeout ${BREAKDOWN_S:-200} taskset -c "$REST" python3 benchmarks/breakdown.py --model resnet56 --k 2 \
  --methods fr,ddg,fdg,dgl --device cuda:0 --root /tmp/gpu-breakdown | tee "$OUT/breakdown-gpu.md"

step "waiting for the CPU overhead runs"
wait
tail -n +1 "$OUT"/overhead-cpu-*.md
step done
