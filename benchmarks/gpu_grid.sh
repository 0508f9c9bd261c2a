#!/usr/bin/env bash
# gpu_grid.sh: the paper's comparison at GPU scale in one device command of about 9 minutes (issue 12).
#
# Trains on one GPU, as sweeps (one process per model and TC level, every run of it trained together):
#   group-tcVAE  beta {10, 40} x gamma {1, 8, 32} at each level in TC_LEVELS  (12 runs a level at 2 seeds)
#   MLVAE, GVAE  beta {1, 4, 16}                                            (6 runs each at 2 seeds)
# for as many steps as fit in TRAIN_S seconds at the speed measured first, then evaluates and summarises them.
#
#   1. Calibrate (skipped when RUNS_DIR/plan.env exists): benchmarks/time_sweeps.py times CAL_STEPS steps of
#      every process after its warm-up, first all at once (one process each, timing together), then one after
#      another (in one process). The faster way is chosen, and STEPS = TRAIN_S / (its ms per step of every run),
#      rounded down to QUANTUM, at most MAX_STEPS. The choice goes into RUNS_DIR/plan.env and gpu_grid.txt.
#   2. Train every process to STEPS (concurrently or in turn, as chosen), with a checkpoint every fifth of the
#      way. At DEADLINE_S seconds after the start they are sent SIGTERM: they write checkpoints and stop, and
#      running this script again (same RUNS_DIR, e.g. the next command on a still-warm machine) continues them.
#   3. Once every run has its metrics.json: python grouptc.py --summarize, then results to $OUT (at most 8 files
#      come back from a device command): gpu_grid.txt (GPU, calibration, plan, timings), results.md, and
#      gpu_grid.tar.gz (every run's config.json, log.csv, metrics.json, figures and the summary's figures;
#      no checkpoints).
#
# Usage:  bash benchmarks/gpu_grid.sh                       # on a machine with a CUDA GPU
#         DEVICE=cpu CAL_STEPS=2 WARMUP=2 QUANTUM=2 MAX_STEPS=8 TRAIN_S=20 SEEDS=0 GTC_BETAS=10 GTC_GAMMAS=8 \
#           BASE_BETAS=1 EVAL_SAMPLES=300 RUNS_DIR=/tmp/gg OUT=/tmp/gg_out bash benchmarks/gpu_grid.sh   # tiny, CPU
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_grid_results}
RUNS_DIR=${RUNS_DIR:-runs/gpu_grid}
DATASET=${DATASET:-dsprites_procedural}
DEVICE=${DEVICE:-cuda}
SEEDS=${SEEDS:-0 1}
GTC_BETAS=${GTC_BETAS:-10 40}
GTC_GAMMAS=${GTC_GAMMAS:-1 8 32}
BASE_BETAS=${BASE_BETAS:-1 4 16}
TC_LEVELS=${TC_LEVELS:-inter full}
CAL_STEPS=${CAL_STEPS:-200}
WARMUP=${WARMUP:-10}
TRAIN_S=${TRAIN_S:-270}
DEADLINE_S=${DEADLINE_S:-450}
MAX_STEPS=${MAX_STEPS:-300000}
QUANTUM=${QUANTUM:-1000}
EVAL_SAMPLES=${EVAL_SAMPLES:-10000}
export PYTHONUNBUFFERED=1
die() { echo "gpu_grid.sh: $*" >&2; exit 2; }
for v in CAL_STEPS WARMUP TRAIN_S DEADLINE_S MAX_STEPS QUANTUM; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive whole number, got '${!v}'"
done
mkdir -p "$OUT" "$RUNS_DIR" || die "cannot create $OUT or $RUNS_DIR"
REPORT=$OUT/gpu_grid.txt
say() { echo "$*" | tee -a "$REPORT" >&2; }
elapsed() { echo $(( $(date +%s) - START )); }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi";
  $PYTHON -c "import torch, numba; print('torch', torch.__version__, 'numba', numba.__version__)"; } |
  tee -a "$REPORT" >&2

csv_list() { echo "${1// /,}"; }
grid=$RUNS_DIR/grid
# One process per model and TC level: NAME and its flags.
NAMES=() FLAGS=()
for tc in $TC_LEVELS; do
  NAMES+=("group_tcvae_tc-$tc")
  FLAGS+=("--model group_tcvae --tc-level $tc --beta $(csv_list "$GTC_BETAS") --gamma $(csv_list "$GTC_GAMMAS")")
done
for m in mlvae gvae; do NAMES+=("$m"); FLAGS+=("--model $m --beta $(csv_list "$BASE_BETAS")"); done
SHARE=$(( $(nproc) / ${#NAMES[@]} )); [ "$SHARE" -ge 1 ] || SHARE=1  # CPU threads of each process run at once

train() {  # train STEPS EXTRA MODE: every process into $grid/NAME, MODE together|in_turn, stopped at DEADLINE_S
  local steps=$1 extra=$2 mode=$3 i pids=() rc=0 cmd left
  for i in "${!NAMES[@]}"; do
    left=$(( DEADLINE_S - $(elapsed) ))
    [ "$left" -gt 5 ] || { rc=1; break; }
    cmd="timeout -s TERM -k 120 $left $PYTHON grouptc.py ${FLAGS[$i]} --dataset $DATASET --seed $(csv_list "$SEEDS") \
--device $DEVICE --steps $steps $extra --out $grid/${NAMES[$i]} --resume"
    mkdir -p "$grid/${NAMES[$i]}"
    if [ "$mode" = together ]; then
      OMP_NUM_THREADS=$SHARE $cmd >>"$grid/${NAMES[$i]}/stdout.log" 2>&1 &
      pids+=($!)
    else
      $cmd >>"$grid/${NAMES[$i]}/stdout.log" 2>&1 || rc=1
    fi
  done
  for i in "${pids[@]}"; do wait "$i" || rc=1; done
  return $rc
}

if [ -f "$RUNS_DIR/plan.env" ]; then
  source "$RUNS_DIR/plan.env"
  say "plan from $RUNS_DIR/plan.env: STEPS=$STEPS MODE=$MODE (continuing)"
else
  sets=()
  for i in "${!NAMES[@]}"; do
    sets+=("${FLAGS[$i]} --dataset $DATASET --seed $(csv_list "$SEEDS") --device $DEVICE")
  done
  barrier=$RUNS_DIR/barrier
  rm -rf "$barrier"
  t0=$(date +%s)
  pids=()
  for i in "${!sets[@]}"; do
    OMP_NUM_THREADS=$SHARE $PYTHON benchmarks/time_sweeps.py --steps "$CAL_STEPS" --warmup "$WARMUP" \
      --barrier "$barrier" --parties ${#sets[@]} "${sets[$i]}" \
      >"$RUNS_DIR/calibrate.together.$i" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || die "calibration (all at once) failed"; done
  t1=$(date +%s)
  $PYTHON benchmarks/time_sweeps.py --steps "$CAL_STEPS" --warmup "$WARMUP" "${sets[@]}" \
    >"$RUNS_DIR/calibrate.in_turn" ||
    die "calibration (one after another) failed"
  t2=$(date +%s)
  together=($(for i in "${!sets[@]}"; do cut -f2 "$RUNS_DIR/calibrate.together.$i"; done))
  in_turn=($(cut -f2 "$RUNS_DIR/calibrate.in_turn"))
  [ ${#together[@]} -eq ${#sets[@]} ] && [ ${#in_turn[@]} -eq ${#sets[@]} ] || die "calibration printed no times"
  # All at once, a step of every process takes the slowest one's time; one after another, their times add up.
  read -r MODE MS STEPS <<<"$($PYTHON - "${together[*]}" "${in_turn[*]}" "$TRAIN_S" "$QUANTUM" "$MAX_STEPS" <<'PY'
import sys
together, in_turn = ([float(v) for v in a.split()] for a in sys.argv[1:3])
train_s, quantum, max_steps = float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
mode, ms = min(("together", max(together)), ("in_turn", sum(in_turn)), key=lambda m: m[1])
print(mode, f"{ms:.3f}", min(max(int(train_s * 1000 / ms) // quantum * quantum, quantum), max_steps))
PY
)"
  say "calibration: $CAL_STEPS steps of each process (${NAMES[*]}) after warm-up, ms per step:"
  say "  all at once:       ${together[*]}  ($((t1 - t0)) s with start-up)"
  say "  one after another: ${in_turn[*]}  ($((t2 - t1)) s with start-up)"
  say "  -> $MODE: $MS ms per step of every run; STEPS=$STEPS fit in TRAIN_S=$TRAIN_S s"
  printf 'STEPS=%s\nMODE=%s\n' "$STEPS" "$MODE" >"$RUNS_DIR/plan.env"
fi

left=$(( DEADLINE_S - $(elapsed) ))
[ "$left" -gt 10 ] || die "no time left before DEADLINE_S=$DEADLINE_S for training; run again to continue"
every=$(( STEPS / 5 > QUANTUM ? STEPS / 5 / QUANTUM * QUANTUM : STEPS ))
t0=$(date +%s)
say "training ${NAMES[*]} to $STEPS steps ($MODE), until at most $DEADLINE_S s after the start (DEADLINE_S)," \
  "checkpoints every $every steps"
if train "$STEPS" "--log-every $(( STEPS / 20 > 0 ? STEPS / 20 : 1 )) --checkpoint-every $every \
--eval-samples $EVAL_SAMPLES" "$MODE"; then
  say "trained and evaluated in $(( $(date +%s) - t0 )) s"
else
  say "not every process finished in $(( $(date +%s) - t0 )) s (deadline, or an error: see $grid/*/stdout.log);" \
    "run this script again to continue from the checkpoints"
fi
for name in "${NAMES[@]}"; do
  tail -n 1 "$grid/$name/stdout.log" 2>/dev/null | sed "s|^|  $name: |" | tee -a "$REPORT" >&2
done

n_runs=$(find "$grid" -name config.json 2>/dev/null | wc -l)
n_done=$(find "$grid" -name metrics.json 2>/dev/null | wc -l)
say "$n_done of $n_runs runs evaluated; $(elapsed) s since this script started"
if [ "$n_done" -gt 0 ] && [ "$n_done" -eq "$n_runs" ]; then
  $PYTHON grouptc.py --summarize "$grid" 2>&1 | tail -n 2 >&2
  cp "$grid/results.md" "$OUT/results.md" 2>/dev/null
fi
tar -czf "$OUT/gpu_grid.tar.gz" --exclude=checkpoint.pt --exclude=.lock -C "$RUNS_DIR" \
  plan.env $(cd "$RUNS_DIR" && ls -d grid calibrate.* 2>/dev/null)
say "wrote $OUT/gpu_grid.tar.gz ($(du -h "$OUT/gpu_grid.tar.gz" | cut -f1))"
[ "$n_done" -eq "$n_runs" ] && [ "$n_runs" -gt 0 ]
