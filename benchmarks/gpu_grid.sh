#!/usr/bin/env bash
# gpu_grid.sh: the paper's comparison at GPU scale in one device command of about 9 minutes (issues 12, 41), as
# run_paper.sh's single-run processes, PER_GPU at a time on one GPU.
#
# The grid (run_paper.sh's, on DATASET, each setting at SEEDS, default 0 1; 16 runs a seed):
#   group-tcVAE  beta GTC_BETAS {10, 40} x gamma GTC_GAMMAS {1, 8, 32} at TC inter, and at the other TC_LEVELS (full)
#                at beta 10, gamma 8 (run_paper.sh's ablation)
#   MLVAE, GVAE, Ada-GVAE (ADA_MODELS)  beta BASE_BETAS {1, 4, 16}
# for as many steps as fit in TRAIN_S seconds at the speed measured first, scored with MIG and group-MIG (METRICS:
# compare.py's scores too, on the GPU's time).
#   1. Calibrate (skipped when RUNS_DIR/plan.env exists): PER_GPU (default 4: the best of benchmarks/gpu.sh's
#      per_gpu, once measured, belongs here) group-tcVAE processes (CAL_MODEL, the slowest model) train at
#      once, each a run of its own in RUNS_DIR/calibrate/; once each has logged twice (start-up and CUDA graph
#      capture done), their log.csv rows of the next CAL_S seconds give each one's ms per step, then they get
#      SIGTERM. STEPS = TRAIN_S / (the slowest one's ms per step x the rounds of PER_GPU runs in the grid), rounded
#      down to QUANTUM, at least QUANTUM, at most MAX_STEPS; into RUNS_DIR/plan.env and gpu_grid.txt.
#   2. Train: run_paper.sh with PER_GPU (JOBS on the CPU) and STEPS into RUNS_DIR/grid, checkpointing every fifth of
#      the way. At DEADLINE_S seconds after the start it gets SIGTERM: every run writes its checkpoint and stops, and
#      running this script again (same RUNS_DIR, e.g. the next command on a still-warm machine) continues them.
#      run_paper.sh ends with compare.py summarize once every run is finished.
#   3. Results to $OUT (at most 8 files come back from a device command): gpu_grid.txt (GPU, calibration, plan,
#      timings), results.md, and gpu_grid.tar.gz (every run's config.json, log.csv, scores.csv, metrics.json and
#      figures, the logs and the summary; no checkpoints).
# MEASURE="1 2 4 8 16" bash benchmarks/gpu_grid.sh measures the calibration at each PER_GPU in turn (throughput of
# concurrent group-tcVAE processes, GPU memory and host memory per process) into gpu_grid.txt, and stops there.
#
# Usage:  bash benchmarks/gpu_grid.sh                       # on a machine with a CUDA GPU
#         DEVICE=cpu PER_GPU=1 CAL_S=1 CAL_LOG=1 QUANTUM=2 MAX_STEPS=2 TRAIN_S=5 SEEDS=0 ONLY_MODELS=gvae \
#           BASE_BETAS=1 EVAL_SAMPLES=100 RUNS_DIR=/tmp/gg OUT=/tmp/gg_out bash benchmarks/gpu_grid.sh   # tiny, CPU
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
read -ra PY <<<"${PYTHON:-python3}"
OUT=${OUT:-gpu_grid_results}
RUNS_DIR=${RUNS_DIR:-runs/gpu_grid}
DATASET=${DATASET:-dsprites_procedural}
DEVICE=${DEVICE:-cuda}
PER_GPU=${PER_GPU:-4}
CAL_S=${CAL_S:-20}
CAL_LOG=${CAL_LOG:-250}
CAL_MODEL=${CAL_MODEL:-group_tcvae}
TRAIN_S=${TRAIN_S:-270}
DEADLINE_S=${DEADLINE_S:-450}
MAX_STEPS=${MAX_STEPS:-300000}
QUANTUM=${QUANTUM:-1000}
export PYTHONUNBUFFERED=1
die() { echo "gpu_grid.sh: $*" >&2; exit 2; }
for v in PER_GPU CAL_S CAL_LOG TRAIN_S DEADLINE_S MAX_STEPS QUANTUM; do
  [[ ${!v} =~ ^[1-9][0-9]{0,8}$ ]] || die "$v must be a positive whole number, got '${!v}'"
done
mkdir -p "$OUT" "$RUNS_DIR" || die "cannot create $OUT or $RUNS_DIR"
REPORT=$OUT/gpu_grid.txt
say() { echo "$*" | tee -a "$REPORT" >&2; }
GRID=(env -u PER_GPU -u GPUS -u JOBS -u PER_TASK -u TCVAE_SETTINGS -u DRY_RUN -u COUNT -u SLURM_ARRAY_TASK_ID
      DATASETS="$DATASET" SEEDS="${SEEDS:-0 1}" TCVAE_BETAS="${GTC_BETAS:-10 40}" TCVAE_GAMMAS="${GTC_GAMMAS:-1 8 32}"
      TC_LEVELS="${TC_LEVELS:-inter full}" ABLATION_BETA=10 ABLATION_GAMMA=8 BASE_BETAS="${BASE_BETAS:-1 4 16}"
      MLVAE_BETAS="${BASE_BETAS:-1 4 16}" GVAE_BETAS="${BASE_BETAS:-1 4 16}" ADA_MODELS="${ADA_MODELS:-ada_gvae}"
      ADA_BETAS="${BASE_BETAS:-1 4 16}" PAIRS=groups GROUP_SIZES=2
      DEVICE="$DEVICE" EVAL_SAMPLES="${EVAL_SAMPLES:-10000}" RUNS_DIR="$RUNS_DIR/grid" METRICS="${METRICS:-}"
      PYTHON="${PYTHON:-python3}")
[ -z "${ONLY_MODELS:-}" ] || GRID+=(ONLY_MODELS="$ONLY_MODELS")

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "${PY[@]}" -c "from importlib.metadata import version as v; print('torch', v('torch'), 'numba', v('numba'))"; } |
  tee -a "$REPORT" >&2

gpu_mib() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n 1; }
calibrate() {  # calibrate P: P processes of CAL_MODEL at once -> MS (the slowest one's ms per step) and a report line
  local p=$1 dir=$RUNS_DIR/calibrate i pids=() rows0=() rows1=() t=0 mib0 mib1 rss=0
  rm -rf "$dir"
  mkdir -p "$dir"
  mib0=$(gpu_mib)
  for ((i = 0; i < p; i++)); do
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / p > 1 ? $(nproc) / p : 1 ))} "${PY[@]}" grouptc.py \
      --model "$CAL_MODEL" --dataset "$DATASET" --device "$DEVICE" --seed "$i" --steps 1000000000 \
      --log-every "$CAL_LOG" --checkpoint-every 1000000000 --eval-samples 100 --out "$dir/$i" >"$dir/$i.log" 2>&1 &
    pids+=($!)
  done
  rows() { local i; for ((i = 0; i < p; i++)); do { wc -l <"$dir/$i/log.csv"; } 2>/dev/null || echo 0; done; }
  until [ "$(rows | sort -n | head -n 1)" -ge 3 ]; do  # a header and two rows each
    for i in "${pids[@]}"; do
      kill -0 "$i" 2>/dev/null || { cat "$dir"/*.log >&2; die "calibration: a process ended"; }
    done
    [ $(( t++ )) -lt 6000 ] || { kill "${pids[@]}"; die "calibration: no steady rows after 10 minutes"; }
    sleep 0.1
  done
  mapfile -t rows0 < <(rows)
  sleep "$CAL_S"
  mapfile -t rows1 < <(rows)
  mib1=$(gpu_mib)
  for i in "${pids[@]}"; do rss=$(( rss + $(ps -o rss= -p "$i" || echo 0) )); done
  kill -TERM "${pids[@]}"
  wait
  read -r MS LINE < <("${PY[@]}" - "$dir" "$p" "${rows0[*]}" "${rows1[*]}" "${mib0:-}" "${mib1:-}" "$rss" <<'PY'
import csv, sys
folder, p, rows0, rows1, mib0, mib1, rss = sys.argv[1:]
ms = []
for i, (a, b) in enumerate(zip(map(int, rows0.split()), map(int, rows1.split()))):
    rows = list(csv.DictReader(open(f"{folder}/{i}/log.csv")))
    rows = rows[a - 1:b - 1] or rows[-1:]  # the rows logged in the window (else the last)
    ms.append(sum(float(r["ms_per_step"]) for r in rows) / len(rows))
p = int(p)
gpu = f"{(int(mib1) - int(mib0)) / p:.0f} MiB GPU memory" if mib0 and mib1 else "GPU memory n/a"
print(f"{max(ms):.3f} PER_GPU={p}: ms/step per process {' '.join(f'{m:.2f}' for m in ms)}; "
      f"{sum(1000 / m for m in ms):.0f} run-steps/s in all; {gpu} and {int(rss) / 1024 / p:.0f} MiB host RSS per "
      "process")
PY
)
  [[ $MS =~ ^[0-9.]+$ ]] || die "calibration: no ms per step in $dir/*/log.csv (see $dir/*.log)"
  say "  $LINE"
}

if [ -n "${MEASURE:-}" ]; then
  say "concurrent $CAL_MODEL processes on one device ($DEVICE), each timed over CAL_S=$CAL_S s once all had started:"
  for p in $MEASURE; do
    [[ $p =~ ^[1-9][0-9]{0,3}$ ]] || die "MEASURE lists '$p': not a number of processes"
    calibrate "$p"
  done
  exit 0
fi
if [ -f "$RUNS_DIR/plan.env" ]; then
  read -r STEPS < <(sed -n 's/^STEPS=\([0-9]*\)$/\1/p' "$RUNS_DIR/plan.env")
  [[ ${STEPS:-} =~ ^[1-9][0-9]*$ ]] || die "$RUNS_DIR/plan.env holds no STEPS; remove it to calibrate again"
  say "plan from $RUNS_DIR/plan.env: STEPS=$STEPS (continuing)"
else
  RUNS=$("${GRID[@]}" COUNT=1 bash run_paper.sh) || die "run_paper.sh refused the grid's settings"
  say "calibration: $PER_GPU $CAL_MODEL processes at once on $DEVICE, timed over CAL_S=$CAL_S s:"
  calibrate "$PER_GPU"
  ROUNDS=$(( (RUNS + PER_GPU - 1) / PER_GPU ))
  STEPS=$("${PY[@]}" -c "import sys; t, ms, r, q, m = map(float, sys.argv[1:])
print(int(min(max(t * 1000 / ms / r // q * q, q), m)))" "$TRAIN_S" "$MS" "$ROUNDS" "$QUANTUM" "$MAX_STEPS")
  say "  -> $RUNS runs in $ROUNDS rounds of $PER_GPU: STEPS=$STEPS fit in TRAIN_S=$TRAIN_S s"
  printf 'STEPS=%s\n' "$STEPS" >"$RUNS_DIR/plan.env"
fi

left=$(( DEADLINE_S - (SECONDS - START) ))
[ "$left" -gt 10 ] || die "no time left before DEADLINE_S=$DEADLINE_S for training; run again to continue"
every=$(( STEPS / 5 > QUANTUM ? STEPS / 5 / QUANTUM * QUANTUM : STEPS ))
if [ "$DEVICE" = cpu ]; then GRID+=(JOBS="$PER_GPU"); else GRID+=(PER_GPU="$PER_GPU"); fi
say "training to $STEPS steps, $PER_GPU at a time, until at most $DEADLINE_S s after the start (DEADLINE_S)," \
  "checkpoints every $every steps"
t0=$SECONDS
timeout -s TERM -k 120 "$left" "${GRID[@]}" STEPS="$STEPS" CHECKPOINT_EVERY="$every" bash run_paper.sh 2>&1 |
  tee -a "$RUNS_DIR/run_paper.log" >&2
rc=${PIPESTATUS[0]}
say "run_paper.sh exited with status $rc after $(( SECONDS - t0 )) s (0: every run finished and summarised; 124" \
  "or 130: the deadline stopped it, run this script again to continue; see $RUNS_DIR/run_paper.log)"
n_runs=$(find "$RUNS_DIR/grid" -name config.json 2>/dev/null | wc -l)
n_done=$(grep -lsE "^ *\"steps\": $STEPS,?\$" "$RUNS_DIR"/grid/*/*/metrics.json | wc -l)
say "$n_done of $n_runs runs evaluated at $STEPS steps; $(( SECONDS - START )) s since this script started"
cp "$RUNS_DIR/grid/summary/results.md" "$OUT/results.md" 2>/dev/null
tar -czf "$OUT/gpu_grid.tar.gz" --exclude=checkpoint.pt --exclude=codes.npz --exclude=.lock -C "$RUNS_DIR" \
  plan.env run_paper.log grid
say "wrote $OUT/gpu_grid.tar.gz ($(du -h "$OUT/gpu_grid.tar.gz" | cut -f1))"
[ "$rc" -eq 0 ] && [ "$n_done" -eq "$n_runs" ] && [ "$n_runs" -gt 0 ]
