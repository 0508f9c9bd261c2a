#!/usr/bin/env bash
# GPU figures for the README, in sections (SECTIONS, default all of them, in this order):
#   step     the step benchmark with the CUDA graph and eagerly (bf16 autocast both), renderers and gather on the GPU
#   tests    the CLI's smoke tests on CUDA
#   run      one real 10,000-step group-tcVAE run, timed
#   per_gpu  PER_GPU = 1, 2, 4, 8, 16 (PER_GPU_LIST) concurrent group-tcVAE processes on one GPU: run-steps/s in all,
#            GPU memory and host RSS per process (benchmarks/gpu_grid.sh's calibration at each; CAL_S seconds each
#            once all have started, default 20: about 5 minutes in all by estimate, not yet timed)
# Results go to RESULTS (default gpu_results/); on the device machine, where $OUT is what comes back (8 files at
# most), they are packed into $OUT/gpu_results.tar.gz, with every log and table also in $OUT/gpu_results.txt.
# The paper's grid at GPU scale is benchmarks/gpu_grid.sh. A dry run of per_gpu on the CPU, tiny:
#   SECTIONS=per_gpu DEVICE=cpu PER_GPU_LIST="1 2" CAL_S=1 CAL_LOG=1 bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${OUT:-}
OUT=${RESULTS:-gpu_results}
SECTIONS=" ${SECTIONS:-step tests run per_gpu} "
DEVICE=${DEVICE:-cuda}
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
if on per_gpu; then
  rm -rf "$OUT/per_gpu_runs"
  MEASURE="${PER_GPU_LIST:-1 2 4 8 16}" DEVICE=$DEVICE RUNS_DIR="$OUT/per_gpu_runs" OUT="$OUT/per_gpu" \
    bash benchmarks/gpu_grid.sh 2>&1 | tee "$OUT/per_gpu.log"
  rm -rf "$OUT/per_gpu_runs"  # checkpoints: too many files to bring back
fi
if [ -n "$DEST" ] && [ "$DEST" != "$OUT" ]; then
  tar -czf "$DEST/gpu_results.tar.gz" -C "$OUT" .
  for f in "$OUT"/*.txt "$OUT"/*.log; do [ -f "$f" ] && { echo "== $(basename "$f")"; cat "$f"; }; done >"$DEST/gpu_results.txt"
fi
