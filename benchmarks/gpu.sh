#!/usr/bin/env bash
# GPU figures for the README: the step benchmark with the CUDA graph and eagerly (bf16 autocast both), renderers
# and gather on the GPU, the CLI's smoke tests on CUDA, one real 10,000-step group-tcVAE run, timed; sweeps of
# S = 1 to 128 runs against single runs, and a sweep's run against the same run alone (2,000 steps, bf16).
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
python3 benchmarks/bench.py --device cuda --only sweep --sizes 1 8 32 64 128 --blocks 5 --block-steps 20 --json "$OUT/bench_sweep.json" 2>&1 | tee "$OUT/bench_sweep.log"
common="--model group_tcvae --dataset dsprites_procedural --steps 2000 --log-every 250 --eval-samples 2000"
python3 grouptc.py $common --seed 0,1 --gamma 1,8 --out "$OUT/sweep" 2>&1 | tail -n 3
python3 grouptc.py $common --seed 1 --gamma 8 --out "$OUT/alone" 2>&1 | tail -n 3
python3 - "$OUT" <<'PY' | tee "$OUT/sweep_vs_alone.txt"
import csv, sys
out = sys.argv[1]
rows = lambda p: list(csv.DictReader(open(p)))
a = rows(f"{out}/sweep/group_tcvae_beta10_gamma8_gs2_tc-inter_seed1/log.csv")
b = rows(f"{out}/alone/log.csv")
for ra, rb in zip(a, b):
    diffs = {k: abs(float(ra[k]) - float(rb[k])) / max(abs(float(rb[k])), 1e-3) for k in ra if k not in ("step", "ms_per_step")}
    print(ra["step"], " ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
PY
rm -f "$OUT"/sweep/*/checkpoint.pt "$OUT"/alone/checkpoint.pt
