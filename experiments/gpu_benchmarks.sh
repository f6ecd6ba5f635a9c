#!/usr/bin/env bash
# The GPU numbers of README's "Performance" section, in one go (several minutes: each compiled run compiles first):
# the CUDA-only tests, task=benchmark with every fast path on and each one off, and the diffusers A/B.
#   bash experiments/gpu_benchmarks.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/gpu_benchmarks}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"

python -m pytest -q tests/test_fast_paths.py tests/test_unet.py tests/test_device_data.py 2>&1 | tail -5 | tee "$out/tests.txt"

bench() {  # NAME OVERRIDES...: one task=benchmark run, its JSON line kept
  local name=$1
  shift
  python main.py task=benchmark logger=none benchmark.batch_size=128 benchmark.steps=50 "$@" \
    hydra.run.dir="$out/$name" | tee "$out/$name.txt" | grep -v '^{'
}
bench all_on
bench no_compile trainer.compile=false
bench no_channels_last trainer.channels_last=false
bench fp32 trainer.precision=fp32
bench plain trainer.precision=fp32 trainer.compile=false trainer.channels_last=false optimizer.fused=false \
  trainer.data_on_device=false
bench batch_256 benchmark.batch_size=256

if python -c "import diffusers" 2>/dev/null; then
  python experiments/compare_diffusers.py --batch-size 128 --rounds 5 --steps-per-round 10 --warmup 5 | tee "$out/diffusers.txt"
  python experiments/compare_diffusers.py --batch-size 128 --rounds 5 --steps-per-round 10 --warmup 5 --no-compile \
    | tee "$out/diffusers_eager.txt"
else
  echo "diffusers is not installed (pip install -e \".[bench]\"): no A/B comparison" | tee "$out/diffusers.txt"
fi
