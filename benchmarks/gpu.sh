#!/usr/bin/env bash
# GPU figures for the README: the step benchmark with the CUDA graph and eagerly (bf16 autocast both), renderers
# and gather on the GPU, the CLI's smoke tests on CUDA, and one real 3,000-step group-tcVAE run, timed.
# Results go to ${OUT:-gpu_results}/.
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, numba; print('torch', torch.__version__, 'numba', numba.__version__)" | tee -a "$OUT/gpu.txt"
python3 benchmarks/bench.py --device cuda --only step render gather --blocks 7 --block-steps 100 --json "$OUT/bench_graph.json" 2>&1 | tee "$OUT/bench_graph.log"
python3 benchmarks/bench.py --device cuda --eager --only step --blocks 7 --block-steps 50 --json "$OUT/bench_eager.json" 2>&1 | tee "$OUT/bench_eager.log"
python3 -m pytest -q test_grouptc.py -k "trains or resumed or eval_only or nan or discriminator_update" 2>&1 | tail -n 15 | tee "$OUT/pytest_cuda.log"
/usr/bin/time -v python3 grouptc.py --model group_tcvae --dataset dsprites_procedural --steps 10000 --log-every 2000 --out "$OUT/run_gtc" 2>&1 | grep -E "step|MIG|Elapsed|Maximum resident" | tee "$OUT/run_gtc.log"
cp "$OUT/run_gtc/metrics.json" "$OUT/run_gtc_metrics.json" 2>/dev/null
rm -rf "$OUT/run_gtc"
