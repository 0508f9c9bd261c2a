#!/usr/bin/env bash
# GPU figures for the README: the step benchmark eager and compiled (bf16 autocast), renderers and gather on the
# GPU, the CLI's smoke tests on CUDA, and one real 3,000-step group-tcVAE run. Results go to ${OUT:-gpu_results}/.
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, numba, h5py, matplotlib; print('torch', torch.__version__, 'numba', numba.__version__)" | tee -a "$OUT/gpu.txt"
python3 benchmarks/bench.py --device cuda --only step render gather --blocks 7 --block-steps 50 --json "$OUT/bench_eager.json" 2>&1 | tee "$OUT/bench_eager.log"
python3 benchmarks/bench.py --device cuda --compile --only step --blocks 7 --block-steps 50 --json "$OUT/bench_compile.json" 2>&1 | tail -n 8 | tee "$OUT/bench_compile.log"
python3 -m pytest -q -x test_grouptc.py -k "trains or resumed or eval_only or nan or discriminator_update" 2>&1 | tail -n 15 | tee "$OUT/pytest_cuda.log"
python3 grouptc.py --model group_tcvae --dataset dsprites_procedural --steps 3000 --log-every 500 --out "$OUT/run_gtc" 2>&1 | tail -n 9 | tee "$OUT/run_gtc.log"
cp "$OUT/run_gtc/metrics.json" "$OUT/run_gtc_metrics.json" 2>/dev/null
rm -rf "$OUT/run_gtc"
