#!/usr/bin/env bash
# GPU figures for the README, in sections (SECTIONS, default all of them, in this order):
#   step   the step benchmark with the CUDA graph and eagerly (bf16 autocast both), renderers and gather on the GPU
#   tests  the CLI's smoke tests on CUDA
#   run    one real 10,000-step group-tcVAE run, timed
#   sweep  sweeps of S = 1, 8, 32, 64, 128 runs against single runs, every model (issue 12, item 4)
#   alone  a sweep's run against the same run trained alone (2,000 steps, bf16; issue 12, item 3)
# Results go to RESULTS (default gpu_results/); on the device machine, where $OUT is what comes back (8 files at
# most), they are packed into $OUT/gpu_results.tar.gz, with every log and table also in $OUT/gpu_results.txt.
# The paper's grid at GPU scale is benchmarks/gpu_grid.sh; after it, on a
# machine still warm: SECTIONS="sweep alone" bash benchmarks/gpu.sh (3-4 minutes by estimate; not yet timed).
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${OUT:-}
OUT=${RESULTS:-gpu_results}
SECTIONS=" ${SECTIONS:-step tests run sweep alone} "
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
on() { [[ $SECTIONS == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, numba; print('torch', torch.__version__, 'numba', numba.__version__)" | tee -a "$OUT/gpu.txt"
if on step; then
  python3 benchmarks/bench.py --device cuda --only step render gather --blocks 7 --block-steps 100 --json "$OUT/bench_graph.json" 2>&1 | tee "$OUT/bench_graph.log"
  python3 benchmarks/bench.py --device cuda --eager --only step --blocks 7 --block-steps 50 --json "$OUT/bench_eager.json" 2>&1 | tee "$OUT/bench_eager.log"
fi
if on tests; then
  python3 -m pytest -q test_grouptc.py -k "trains or resumed or eval_only or nan or discriminator_update" 2>&1 | tail -n 15 | tee "$OUT/pytest_cuda.log"
fi
if on run; then
  /usr/bin/time -v python3 grouptc.py --model group_tcvae --dataset dsprites_procedural --steps 10000 --log-every 2000 --out "$OUT/run_gtc" 2>&1 | grep -E "step|MIG|Elapsed|Maximum resident" | tee "$OUT/run_gtc.log"
  cp "$OUT/run_gtc/metrics.json" "$OUT/run_gtc_metrics.json" 2>/dev/null
  rm -rf "$OUT/run_gtc"
fi
if on sweep; then
  python3 benchmarks/bench.py --device cuda --only sweep --sizes 1 8 32 64 128 --blocks 5 --block-steps 20 --json "$OUT/bench_sweep.json" 2>&1 | tee "$OUT/bench_sweep.log"
fi
if on alone; then
  common="--model group_tcvae --dataset dsprites_procedural --steps 2000 --log-every 250 --eval-samples 2000"
  rm -rf "$OUT/sweep" "$OUT/alone"
  python3 grouptc.py $common --seed 0,1 --gamma 1,8 --out "$OUT/sweep" 2>&1 | tail -n 3
  python3 grouptc.py $common --seed 1 --gamma 8 --out "$OUT/alone" 2>&1 | tail -n 3
  python3 - "$OUT" <<'PY' | tee "$OUT/sweep_vs_alone.txt"
import csv, sys
out = sys.argv[1]
rows = lambda p: list(csv.DictReader(open(p)))
a = rows(f"{out}/sweep/group_tcvae_dsprites_procedural_beta10_gamma8_gs2_tc-inter_seed1/log.csv")
b = rows(f"{out}/alone/log.csv")
print("relative difference, sweep's run vs the run alone, per logged term")
for ra, rb in zip(a, b):
    diffs = {k: abs(float(ra[k]) - float(rb[k])) / max(abs(float(rb[k])), 1e-3) for k in ra if k not in ("step", "ms_per_step")}
    print(ra["step"], " ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
PY
  rm -rf "$OUT/sweep" "$OUT/alone"  # checkpoints and figures: too many files to bring back
fi
if [ -n "$DEST" ] && [ "$DEST" != "$OUT" ]; then
  tar -czf "$DEST/gpu_results.tar.gz" -C "$OUT" .
  for f in "$OUT"/*.txt "$OUT"/*.log; do [ -f "$f" ] && { echo "== $(basename "$f")"; cat "$f"; }; done >"$DEST/gpu_results.txt"
fi
