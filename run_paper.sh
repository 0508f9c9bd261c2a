#!/usr/bin/env bash
# run_paper.sh: the paper's grid of runs, then its figures and table.
#
# Reproduces, on each data set in DATASETS:
#   Figure 4   density of MIG and group-MIG over all runs of group-tcVAE, MLVAE and GVAE
#   Figure 3b  group-MIG of content vs non-content factors over the baselines' runs
#   Figure 3c  MIG of MLVAE and GVAE against the number of observations sharing a group
#   ablation   (not in the paper) group-tcVAE at one setting with each of the three TC levels
# and results.md (runs, mean, median, best MIG and group-MIG per model), via `python grouptc.py --summarize`.
#
# Size of the full grid, per data set:
#   group-tcVAE  beta {10,20,30,40,50,100} x gamma {1,8,16,32,64} x 5 seeds ..... 150 runs
#   MLVAE, GVAE  beta {1,2,4,6,8,16} x 5 seeds (Locatello et al. 2020) ......... 60 runs
#   Figure 3c    MLVAE, GVAE at group size 3, 5, 10 (2 is in the line above) ... 30 runs
#   ablation     TC levels inter_intra, full at (ABLATION_BETA, ABLATION_GAMMA) .. 10 runs
#   = 250 runs per data set, 500 for dsprites and shapes3d, 300,000 steps each.
# GPU time, estimated from steps measured on one H100 (benchmarks/gpu.sh, README "Speed"): group-tcVAE 2.05 ms/step
# (10.3 min a run), MLVAE/GVAE 1.4 ms/step (7 min a run) at 32 pairs; per data set 160 group-tcVAE runs and 90
# baseline runs = about 38 GPU-hours, about 76 for both data sets, plus a few seconds of evaluation per run.
# Groups of 3 to 10 observations and 3D Shapes' 3 channels make some steps longer: not measured, so count more.
#
# Usage:
#   DRY_RUN=1 bash run_paper.sh             # print one complete command per run, run nothing
#   GPUS="0 1 2 3" bash run_paper.sh        # one run per GPU at a time
#   JOBS=2 bash run_paper.sh                # CPU only: JOBS runs at a time, threads shared among them
#   STEPS=3000 SEEDS="0 1 2" DATASETS=dsprites_procedural TCVAE_BETAS=10 TCVAE_GAMMAS="1 8" BASE_BETAS=1 \
#     GROUP_SIZES=2 TC_LEVELS=inter LOG_EVERY=250 CHECKPOINT_EVERY=500 JOBS=2 RUNS_DIR=runs/cpu \
#     bash run_paper.sh                      # the README's CPU-scale grid: 12 runs, about 2 h on 2 cores
# Finished runs (metrics.json present) are skipped; interrupted ones resume from their checkpoint.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python}
RUNS_DIR=${RUNS_DIR:-runs/paper}
DATA_DIR=${DATA_DIR:-data}
DATASETS=(${DATASETS:-dsprites shapes3d})
SEEDS=(${SEEDS:-0 1 2 3 4})
STEPS=${STEPS:-300000}
BATCH_SIZE=${BATCH_SIZE:-32}
TCVAE_BETAS=(${TCVAE_BETAS:-10 20 30 40 50 100})
TCVAE_GAMMAS=(${TCVAE_GAMMAS:-1 8 16 32 64})
TCVAE_SETTINGS=(${TCVAE_SETTINGS:-})  # "BETA:GAMMA ..." pairs instead of the product TCVAE_BETAS x TCVAE_GAMMAS
BASE_BETAS=(${BASE_BETAS:-1 2 4 6 8 16})
GROUP_SIZES=(${GROUP_SIZES:-2 3 5 10})
TC_LEVELS=(${TC_LEVELS:-inter inter_intra full})
ABLATION_BETA=${ABLATION_BETA:-10}
ABLATION_GAMMA=${ABLATION_GAMMA:-8}
DEVICE=${DEVICE:-auto}
EVAL_SAMPLES=${EVAL_SAMPLES:-10000}
LOG_EVERY=${LOG_EVERY:-500}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-5000}
GPUS=(${GPUS:-})
JOBS=${JOBS:-1}

content_factors() {
  case "$1" in
    dsprites|dsprites_procedural) echo "shape,scale,orientation" ;;
    shapes3d|shapes3d_procedural) echo "object_hue,scale,shape" ;;
    *) echo "run_paper.sh: unknown data set '$1'" >&2; exit 2 ;;
  esac
}

CMDS=()
OUTS=()
add() {  # add DATASET MODEL BETA GAMMA GROUP_SIZE TC_LEVEL SEED
  local d=$1 m=$2 b=$3 g=$4 gs=$5 tc=$6 s=$7
  local out="$RUNS_DIR/$d/${m}_beta${b}_gamma${g}_gs${gs}_tc-${tc}_seed${s}"
  local o
  for o in "${OUTS[@]:+${OUTS[@]}}"; do [ "$o" = "$out" ] && return 0; done  # listed already
  OUTS+=("$out")
  CMDS+=("$PYTHON grouptc.py --model $m --dataset $d --data-dir $DATA_DIR --steps $STEPS --batch-size $BATCH_SIZE \
--group-size $gs --beta $b --gamma $g --tc-level $tc --content-factors $(content_factors "$d") --latent-dim 10 \
--content-dims 5 --seed $s --device $DEVICE --eval-samples $EVAL_SAMPLES --log-every $LOG_EVERY \
--checkpoint-every $CHECKPOINT_EVERY --out $out --resume")
}

if [ ${#TCVAE_SETTINGS[@]} -eq 0 ]; then
  for b in "${TCVAE_BETAS[@]}"; do for g in "${TCVAE_GAMMAS[@]}"; do TCVAE_SETTINGS+=("$b:$g"); done; done
fi

for d in "${DATASETS[@]}"; do
  for s in "${SEEDS[@]}"; do
    for bg in "${TCVAE_SETTINGS[@]}"; do add "$d" group_tcvae "${bg%%:*}" "${bg##*:}" 2 inter "$s"; done
    for m in mlvae gvae; do for b in "${BASE_BETAS[@]}"; do add "$d" "$m" "$b" 0 2 inter "$s"; done; done
    for m in mlvae gvae; do for gs in "${GROUP_SIZES[@]}"; do add "$d" "$m" "${BASE_BETAS[0]}" 0 "$gs" inter "$s"; done; done
    for tc in "${TC_LEVELS[@]}"; do add "$d" group_tcvae "$ABLATION_BETA" "$ABLATION_GAMMA" 2 "$tc" "$s"; done
  done
done

if [ -n "${DRY_RUN:-}" ]; then
  printf '%s\n' "${CMDS[@]}"
  exit 0
fi

# Workers take the next unclaimed run (mkdir is atomic), so a slow run never holds up a queue.
mkdir -p "$RUNS_DIR"
find "$RUNS_DIR" -maxdepth 3 -name .claim -type d -exec rmdir {} + 2>/dev/null || true
worker() {  # worker ENV_PREFIX
  local i
  for i in "${!CMDS[@]}"; do
    local out=${OUTS[$i]}
    [ -f "$out/metrics.json" ] && continue
    mkdir -p "$out"
    mkdir "$out/.claim" 2>/dev/null || continue
    echo "[$(date +%H:%M:%S)] start $out" >&2
    if env $1 bash -c "${CMDS[$i]}" >>"$out/stdout.log" 2>&1; then
      echo "[$(date +%H:%M:%S)] done  $out" >&2
    else
      echo "[$(date +%H:%M:%S)] FAILED $out (see $out/stdout.log)" >&2
    fi
    rmdir "$out/.claim"
  done
}

echo "run_paper.sh: ${#CMDS[@]} runs in $RUNS_DIR" >&2
if [ ${#GPUS[@]} -gt 0 ]; then
  for gpu in "${GPUS[@]}"; do worker "CUDA_VISIBLE_DEVICES=$gpu" & done
else
  threads=$(( $(nproc) / JOBS )); [ "$threads" -ge 1 ] || threads=1
  for _ in $(seq "$JOBS"); do worker "OMP_NUM_THREADS=$threads" & done
fi
wait
$PYTHON grouptc.py --summarize "$RUNS_DIR"
