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
#   COUNT=1 bash run_paper.sh               # print the number of runs (entries 0 .. COUNT-1)
#   GPUS="0 1 2 3" bash run_paper.sh        # one run per GPU at a time
#   JOBS=2 bash run_paper.sh                # CPU only: JOBS runs at a time, threads shared among them
#   STEPS=3000 SEEDS="0 1 2" DATASETS=dsprites_procedural TCVAE_BETAS=10 TCVAE_GAMMAS="1 8" BASE_BETAS=1 \
#     GROUP_SIZES=2 TC_LEVELS=inter LOG_EVERY=250 CHECKPOINT_EVERY=500 JOBS=2 RUNS_DIR=runs/cpu \
#     bash run_paper.sh                      # the README's CPU-scale grid: 12 runs, about 2 h on 2 cores
#   sbatch --array=0-499%16 --gres=gpu:1 run_paper.sh   # SLURM: array task i runs entry i of DRY_RUN's list
#   python grouptc.py --summarize runs/paper           # ... then the summary, once every task has finished
# Finished runs (metrics.json present) are skipped; interrupted ones resume from their checkpoint. Each run folder
# is held by the process training it (an OS lock that dies with the process), so several run_paper.sh, on one
# machine or on several sharing RUNS_DIR, never train the same run twice; the summary is written by the last one
# to see every run finished. Under SLURM, submit from the repository's folder with the same overrides set.
set -euo pipefail
if [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "$SLURM_SUBMIT_DIR/grouptc.py" ]; then
  cd "$SLURM_SUBMIT_DIR"  # sbatch runs a copy of this script from its spool folder
else
  cd "$(dirname "$0")"
fi
die() { echo "run_paper.sh: $*" >&2; exit 2; }

PYTHON=${PYTHON:-python}
RUNS_DIR=${RUNS_DIR-runs/paper}
DATA_DIR=${DATA_DIR-data}
# Lists: unset means the paper's; set to nothing is an error (not the whole grid by surprise).
DATASETS=(${DATASETS-dsprites shapes3d})
SEEDS=(${SEEDS-0 1 2 3 4})
STEPS=${STEPS-300000}
BATCH_SIZE=${BATCH_SIZE-32}
TCVAE_BETAS=(${TCVAE_BETAS-10 20 30 40 50 100})
TCVAE_GAMMAS=(${TCVAE_GAMMAS-1 8 16 32 64})
TCVAE_SETTINGS=(${TCVAE_SETTINGS:-})  # "BETA:GAMMA ..." pairs instead of the product TCVAE_BETAS x TCVAE_GAMMAS
BASE_BETAS=(${BASE_BETAS-1 2 4 6 8 16})
GROUP_SIZES=(${GROUP_SIZES-2 3 5 10})
TC_LEVELS=(${TC_LEVELS-inter inter_intra full})
ABLATION_BETA=${ABLATION_BETA-10}
ABLATION_GAMMA=${ABLATION_GAMMA-8}
DEVICE=${DEVICE-auto}
EVAL_SAMPLES=${EVAL_SAMPLES-10000}
LOG_EVERY=${LOG_EVERY-500}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY-5000}
GPUS=(${GPUS:-})
JOBS=${JOBS-1}

# Check every setting before anything runs.
for v in DATASETS SEEDS TCVAE_BETAS TCVAE_GAMMAS BASE_BETAS GROUP_SIZES TC_LEVELS; do
  eval "n=\${#$v[@]}"
  [ "$n" -gt 0 ] || die "$v is set but empty; unset it for the paper's values, or list some"
done
for v in STEPS BATCH_SIZE JOBS LOG_EVERY CHECKPOINT_EVERY; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive whole number, got '${!v}'"
done
[[ $EVAL_SAMPLES =~ ^[0-9]+$ ]] || die "EVAL_SAMPLES must be a whole number (0: every point), got '$EVAL_SAMPLES'"
for s in "${SEEDS[@]}"; do [[ $s =~ ^[0-9]+$ ]] || die "SEEDS must be whole numbers, got '$s'"; done
for n in "${TCVAE_BETAS[@]}" "${TCVAE_GAMMAS[@]}" "${BASE_BETAS[@]}" "$ABLATION_BETA" "$ABLATION_GAMMA"; do
  [[ $n =~ ^[0-9]+([.][0-9]+)?$ ]] || die "betas and gammas must be non-negative numbers, got '$n'"
done
for bg in "${TCVAE_SETTINGS[@]:+${TCVAE_SETTINGS[@]}}"; do
  [[ $bg =~ ^[0-9]+([.][0-9]+)?:[0-9]+([.][0-9]+)?$ ]] || die "TCVAE_SETTINGS takes BETA:GAMMA pairs, got '$bg'"
done
for gs in "${GROUP_SIZES[@]}"; do
  [[ $gs =~ ^[0-9]+$ ]] && [ "$gs" -ge 2 ] || die "GROUP_SIZES must be whole numbers >= 2, got '$gs'"
done
for tc in "${TC_LEVELS[@]}"; do
  case "$tc" in inter|inter_intra|full) ;; *) die "TC_LEVELS: unknown level '$tc' (inter, inter_intra, full)" ;; esac
done
for v in RUNS_DIR DATA_DIR; do
  [ -n "${!v}" ] || die "$v is empty"
  [[ ${!v} =~ [[:space:]] ]] && die "$v must not contain spaces or tabs (it goes into every command), got '${!v}'"
done

content_factors() {
  case "$1" in
    dsprites|dsprites_procedural) echo "shape,scale,orientation" ;;
    shapes3d|shapes3d_procedural) echo "object_hue,scale,shape" ;;
    *) die "unknown data set '$1' in DATASETS (dsprites, shapes3d, dsprites_procedural, shapes3d_procedural)" ;;
  esac
}
for d in "${DATASETS[@]}"; do content_factors "$d" >/dev/null; done

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
if [ -n "${COUNT:-}" ]; then
  echo "${#CMDS[@]}"
  exit 0
fi

run_entry() {  # run_entry INDEX ENV_PREFIX: run entry INDEX unless it is finished or another process holds it
  local out=${OUTS[$1]} rc=0
  [ -f "$out/metrics.json" ] && return 0
  mkdir -p "$out"
  echo "[$(date +%H:%M:%S)] start $out" >&2
  env $2 bash -c "${CMDS[$1]}" >>"$out/stdout.log" 2>&1 || rc=$?
  case $rc in
    0) echo "[$(date +%H:%M:%S)] done  $out" >&2 ;;
    3) echo "[$(date +%H:%M:%S)] skip  $out (another process is training it)" >&2 ;;
    *) echo "[$(date +%H:%M:%S)] FAILED $out (see $out/stdout.log)" >&2 ;;
  esac
  return $rc
}

if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then  # one entry per array task; the summary is a separate step
  i=$SLURM_ARRAY_TASK_ID
  [[ $i =~ ^[0-9]+$ ]] && [ "$i" -lt ${#CMDS[@]} ] ||
    die "SLURM_ARRAY_TASK_ID $i is not an entry (0..$(( ${#CMDS[@]} - 1 )))"
  run_entry "$i" "OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-$(nproc)}"
  exit $?
fi

worker() {  # worker ENV_PREFIX: every entry in turn; a held or finished one is passed by
  local i
  for i in "${!CMDS[@]}"; do run_entry "$i" "$1" || true; done
}

echo "run_paper.sh: ${#CMDS[@]} runs in $RUNS_DIR" >&2
mkdir -p "$RUNS_DIR"
if [ ${#GPUS[@]} -gt 0 ]; then
  for gpu in "${GPUS[@]}"; do worker "CUDA_VISIBLE_DEVICES=$gpu" & done
else
  threads=$(( $(nproc) / JOBS )); [ "$threads" -ge 1 ] || threads=1
  for _ in $(seq "$JOBS"); do worker "OMP_NUM_THREADS=$threads" & done
fi
wait
left=0
for out in "${OUTS[@]}"; do [ -f "$out/metrics.json" ] || left=$((left + 1)); done
if [ "$left" -gt 0 ]; then
  echo "run_paper.sh: $left of ${#CMDS[@]} runs are not finished (failed, or still training in another process);" \
    "no summary yet. Run this script again, or when all are done: $PYTHON grouptc.py --summarize $RUNS_DIR" >&2
  exit 1
fi
$PYTHON grouptc.py --summarize "$RUNS_DIR"
