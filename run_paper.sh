#!/usr/bin/env bash
# run_paper.sh: the paper's grid of runs, then its figures and table.
#
# Reproduces, on each data set in DATASETS:
#   Figure 4   density of MIG and group-MIG over all runs of group-tcVAE, MLVAE and GVAE
#   Figure 3b  group-MIG of content vs non-content factors over the baselines' runs
#   Figure 3c  MIG of MLVAE and GVAE against the number of observations sharing a group
#   ablation   (not in the paper) group-tcVAE at one setting with each of the three TC levels
#   Ada        (not in the paper) Ada-GVAE and Ada-ML-VAE (Locatello et al. 2020), which infer what a pair shares
# and results.md (runs, mean, median, best MIG and group-MIG per model), via `python grouptc.py --summarize`.
#
# Size of the full grid, per data set:
#   group-tcVAE  beta {10,20,30,40,50,100} x gamma {1,8,16,32,64} x 5 seeds ..... 150 runs
#   MLVAE, GVAE  beta {1,2,4,6,8,16} x 5 seeds (Locatello et al. 2020) ......... 60 runs
#   Figure 3c    MLVAE, GVAE at group size 3, 5, 10 (2 is in the line above) ... 30 runs
#   ablation     TC levels inter_intra, full at (ABLATION_BETA, ABLATION_GAMMA) .. 10 runs
#   Ada          Ada-GVAE, Ada-ML-VAE: beta {1,2,4,6,8,16} x 5 seeds x PAIRS ..... 60 runs
#   = 310 runs per data set, 620 for dsprites and shapes3d, 300,000 steps each.
# GPU time, estimated from steps measured on one H100 (benchmarks/gpu.sh, README "Speed"): group-tcVAE 2.05 ms/step
# (10.3 min a run), MLVAE/GVAE 1.4 ms/step (7 min a run) at 32 pairs, the Ada models as MLVAE/GVAE (not measured);
# per data set 160 group-tcVAE runs and 150 others = about 45 GPU-hours, about 90 for both data sets, plus a few
# seconds of evaluation per run.
# Groups of 3 to 10 observations and 3D Shapes' 3 channels make some steps longer: not measured, so count more.
# With GPUS, runs are packed into sweeps of up to SWEEP_SIZE runs a process (30 processes at 64), which is what
# should cut this: sweep speed on a GPU is not measured yet (benchmarks/gpu.sh measures it), so no figure here.
#
# Usage:
#   DRY_RUN=1 bash run_paper.sh             # print one complete command per process (a run or a sweep), run nothing
#   COUNT=1 bash run_paper.sh               # print the number of processes (entries 0 .. COUNT-1)
#   GPUS="0 1 2 3" bash run_paper.sh        # one process per GPU at a time, each a sweep of up to SWEEP_SIZE runs
#   JOBS=2 bash run_paper.sh                # CPU only: JOBS runs at a time, the cores' threads shared among them
#                                           # (or OMP_NUM_THREADS each, when set: two scripts on one machine)
#   STEPS=30000 SEEDS="0 1 2" DATASETS=dsprites_procedural TCVAE_SETTINGS=10:8 MLVAE_BETAS=1 GVAE_BETAS=4 \
#     ADA_MODELS=ada_gvae ADA_BETAS=1 GROUP_SIZES=2 TC_LEVELS=full EVAL_EVERY=3000 METRICS=all LOG_EVERY=500 \
#     CHECKPOINT_EVERY=1000 OMP_NUM_THREADS=1 JOBS=1 RUNS_DIR=runs/cpu_study_30k \
#     bash run_paper.sh                      # the 30,000-step CPU study's settings (15 runs, issue 21)
#                                           # (the 3,000-step CPU study's commands are in the README)
#   SWEEP_SIZE=64 sbatch --array=0-29%8 --gres=gpu:1 run_paper.sh  # SLURM: task i runs entry i of DRY_RUN's list
#   python grouptc.py --summarize runs/paper           # ... then the summary, once every task has finished
# Every run has one folder, RUNS_DIR/DATASET/NAME, NAME its settings (however runs are packed into processes).
# Finished runs (evaluated at STEPS: their metrics.json says so) are skipped; interrupted ones resume from their
# checkpoint (a process resumes its runs that have one and starts the others). Each run folder
# is held by the process training it (an OS lock that dies with the process), so several run_paper.sh, on one
# machine or on several sharing RUNS_DIR, never train the same run twice; the summary is written by the last one
# to see every run finished. Each process's output goes to RUNS_DIR/logs/. Under SLURM, submit from the
# repository's folder with the same overrides set.
set -euo pipefail
for v in RUNS_DIR DATA_DIR; do  # given relative: to the folder you run this from, not to the script's
  [ -n "${!v:-}" ] && [[ ${!v} != /* ]] && printf -v "$v" '%s' "$PWD/${!v}"
done
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
TCVAE_PAIRS=${TCVAE_SETTINGS[*]:+1}
BASE_BETAS=(${BASE_BETAS-1 2 4 6 8 16})
MLVAE_BETAS=(${MLVAE_BETAS-${BASE_BETAS[*]}})  # one baseline's betas apart from the other's (default: BASE_BETAS)
GVAE_BETAS=(${GVAE_BETAS-${BASE_BETAS[*]}})
ADA_MODELS=(${ADA_MODELS-ada_gvae ada_mlvae})  # Locatello et al. 2020's models (infer what a pair shares), or none
ADA_BETAS=(${ADA_BETAS-1 2 4 6 8 16})  # the weak-supervision grid of a disentanglement_lib fork
PAIRS=(${PAIRS-groups})  # the Ada models' pairs: groups (the paper's), k_factors (DL's), k_factors_exact
K=${K-rnd}  # k-factor pairs: factors resampled per pair, or rnd
ONLY_MODELS=(${ONLY_MODELS-group_tcvae mlvae gvae ada_gvae ada_mlvae})  # the part of the grid to run: these models'
GROUP_SIZES=(${GROUP_SIZES-2 3 5 10})
TC_LEVELS=(${TC_LEVELS-inter inter_intra full})
ABLATION_BETA=${ABLATION_BETA-10}
ABLATION_GAMMA=${ABLATION_GAMMA-8}
DEVICE=${DEVICE-auto}
EVAL_SAMPLES=${EVAL_SAMPLES-10000}
EVAL_EVERY=${EVAL_EVERY-0}  # steps between evaluations during training (scores.csv); 0: only at the end
METRICS=${METRICS-}  # what the final evaluation scores (grouptc.py --metrics: all, or a comma list); unset: its default
LOG_EVERY=${LOG_EVERY-500}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY-5000}
GPUS=(${GPUS:-})
JOBS=${JOBS-1}
# Runs trained together in one process (a sweep). Default: 1 (one run a process) unless GPUS is given; then as
# many as the smallest listed GPU holds at MIB_PER_RUN each, at most 64. MIB_PER_RUN (256) is an estimate: a
# group-tcVAE run's weights, gradients and Adam states take 87 MiB (5.7 M parameters), its activations at 32 pairs
# a few tens more. Under SLURM set it explicitly, the same where you count entries and where the tasks run.
MIB_PER_RUN=${MIB_PER_RUN-256}
if [ -z "${SWEEP_SIZE:-}" ]; then
  SWEEP_SIZE=1
  if [ ${#GPUS[@]} -gt 0 ] && command -v nvidia-smi >/dev/null; then
    mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i "$(IFS=,; echo "${GPUS[*]}")" |
          sort -n | head -n 1)
    SWEEP_SIZE=$(( mib / MIB_PER_RUN ))
    [ "$SWEEP_SIZE" -le 64 ] || SWEEP_SIZE=64
    [ "$SWEEP_SIZE" -ge 1 ] || SWEEP_SIZE=1
  fi
fi

# Check every setting before anything runs.
for v in DATASETS SEEDS TCVAE_BETAS TCVAE_GAMMAS BASE_BETAS MLVAE_BETAS GVAE_BETAS ADA_MODELS ADA_BETAS PAIRS \
  ONLY_MODELS GROUP_SIZES TC_LEVELS; do
  eval "n=\${#$v[@]}"
  [ "$n" -gt 0 ] || die "$v is set but empty; unset it for the paper's values, or list some"
done
for v in STEPS BATCH_SIZE JOBS LOG_EVERY CHECKPOINT_EVERY SWEEP_SIZE MIB_PER_RUN; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive whole number, got '${!v}'"
done
[[ -z ${OMP_NUM_THREADS:-} || $OMP_NUM_THREADS =~ ^[1-9][0-9]*$ ]] ||
  die "OMP_NUM_THREADS must be a positive whole number when set, got '$OMP_NUM_THREADS'"
[[ $EVAL_SAMPLES =~ ^[0-9]+$ ]] || die "EVAL_SAMPLES must be a whole number (0: every point), got '$EVAL_SAMPLES'"
[[ $EVAL_EVERY =~ ^[0-9]+$ ]] || die "EVAL_EVERY must be a whole number (0: only at the end), got '$EVAL_EVERY'"
for s in "${SEEDS[@]}"; do
  [[ $s =~ ^[0-9]{1,15}$ ]] || die "SEEDS must be whole numbers (up to 15 digits), got '$s'"
done
[[ $METRICS =~ [[:space:]] ]] && die "METRICS is one comma list without spaces (all, or e.g. mig,sap), got '$METRICS'"
for n in "${TCVAE_BETAS[@]}" "${TCVAE_GAMMAS[@]}" "${MLVAE_BETAS[@]}" "${GVAE_BETAS[@]}" "${ADA_BETAS[@]}" \
  "$ABLATION_BETA" "$ABLATION_GAMMA"; do
  [[ $n =~ ^[0-9]+([.][0-9]+)?$ ]] || die "betas and gammas must be non-negative numbers, got '$n'"
done
for bg in "${TCVAE_SETTINGS[@]:+${TCVAE_SETTINGS[@]}}"; do
  [[ $bg =~ ^[0-9]+([.][0-9]+)?:[0-9]+([.][0-9]+)?$ ]] || die "TCVAE_SETTINGS takes BETA:GAMMA pairs, got '$bg'"
done
for gs in "${GROUP_SIZES[@]}"; do
  [[ $gs =~ ^[0-9]+$ ]] && [ "$gs" -ge 2 ] || die "GROUP_SIZES must be whole numbers >= 2, got '$gs'"
done
[ "${ADA_MODELS[*]}" = none ] && ADA_MODELS=()  # none: no Ada runs
for m in "${ONLY_MODELS[@]}"; do
  case "$m" in group_tcvae|mlvae|gvae|ada_gvae|ada_mlvae) ;; *) die "ONLY_MODELS: unknown model '$m'" ;; esac
done
for m in "${ADA_MODELS[@]}"; do
  case "$m" in ada_gvae|ada_mlvae) ;; *) die "ADA_MODELS: unknown model '$m' (ada_gvae, ada_mlvae, or none)" ;; esac
done
for p in "${PAIRS[@]}"; do
  case "$p" in groups|k_factors|k_factors_exact) ;;
    *) die "PAIRS: unknown kind '$p' (groups, k_factors, k_factors_exact)" ;; esac
done
[[ $K == rnd || $K =~ ^[1-9][0-9]*$ ]] || die "K must be rnd or a positive whole number, got '$K'"
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
declare -A CONTENT=()  # each data set's content factors
for d in "${DATASETS[@]}"; do CONTENT[$d]=$(content_factors "$d") || exit 2; done

# Numbers exactly as the program writes them in a run's folder name (10.0 -> 10, 0.1000001 stays), so that
# finished runs are recognised whatever the packing: every list in one call, one line each (BETA:GAMMA pairs too).
EXACT=(BASE_BETAS TCVAE_BETAS TCVAE_GAMMAS MLVAE_BETAS GVAE_BETAS ADA_BETAS ABLATION_BETA ABLATION_GAMMA TCVAE_SETTINGS)
mapfile -t lines < <(for v in "${EXACT[@]}"; do eval "echo \"\${$v[*]:-}\""; done | "$PYTHON" -c 'import sys
exact = lambda t: t[:-2] if t.endswith(".0") else t
for line in sys.stdin:
    print(" ".join(":".join(exact(repr(float(n))) for n in v.split(":")) for v in line.split()))')
[ ${#lines[@]} -eq ${#EXACT[@]} ] || die "could not write the betas and gammas as numbers with $PYTHON"
for i in "${!EXACT[@]}"; do eval "${EXACT[$i]}=(${lines[$i]})"; done
SEEDS=($(for s in "${SEEDS[@]}"; do echo $((10#$s)); done))  # 007 -> 7, as the program reads it (exactly)
GROUP_SIZES=($(for gs in "${GROUP_SIZES[@]}"; do echo $((10#$gs)); done))
for v in DATASETS SEEDS BASE_BETAS TCVAE_BETAS TCVAE_GAMMAS TCVAE_SETTINGS MLVAE_BETAS GVAE_BETAS ADA_MODELS \
  ADA_BETAS PAIRS ONLY_MODELS GROUP_SIZES TC_LEVELS; do  # a value twice would name one run twice
  eval "dup=\$(printf '%s\\n' \"\${$v[@]:+\${$v[@]}}\" | sort | uniq -d | head -n 1)"
  [ -z "$dup" ] || die "$v lists '$dup' twice (numbers compared exactly); list each value once"
done

CMDS=()     # one command per process: a run, or a sweep of runs trained together
LOGS=()     # where its output goes
MEMBERS=()  # the run folders it trains, to tell when it is finished
declare -A LISTED=()  # every run listed so far, as DATASET/NAME (a look-up, not a search of a growing string)
# Every run is at RUNS_DIR/DATASET/NAME, NAME its settings as the program names a sweep's run (run_name()): the
# same folder however runs are packed into processes, so that changing SWEEP_SIZE, GPUS or JOBS never trains a
# finished run again. A sweep's process gets --out RUNS_DIR/DATASET and puts each of its runs there.
add() {  # add DATASET MODEL GROUP_SIZE TC_LEVEL "BETAS" "GAMMAS" "SEEDS" PAIRS: one process for their product
  local d=$1 m=$2 gs=$3 tc=$4 betas=$5 gammas=$6 seeds=$7 pairs=$8 b g s name names=() fresh=0 out members="" more
  local kind="" bs=""  # as the program names a run on k-factor pairs, or at another batch size
  [ "$pairs" = groups ] || kind="_pairs-${pairs}-k${K}"
  [ "$BATCH_SIZE" = 32 ] || bs="_bs${BATCH_SIZE}"
  [[ " ${ONLY_MODELS[*]} " == *" $m "* ]] || return 0
  for s in $seeds; do for b in $betas; do for g in $gammas; do
    name="${m}_${d}_beta${b}_gamma${g}_gs${gs}_tc-${tc}${kind}${bs}_seed${s}"
    [ -n "${LISTED[$d/$name]:-}" ] || fresh=1
    LISTED[$d/$name]=1
    names+=("$name")
    members+="$RUNS_DIR/$d/$name "
  done; done; done
  [ "$fresh" = 1 ] || return 0  # every run of it is listed already
  if [ ${#names[@]} -eq 1 ]; then out="$RUNS_DIR/$d/${names[0]}"; else out="$RUNS_DIR/$d"; fi
  if [ ${#names[@]} -eq 1 ]; then more=""; else more="+$(( ${#names[@]} - 1 ))"; fi
  LOGS+=("$RUNS_DIR/logs/${names[0]}$more.log")
  MEMBERS+=("$members")
  CMDS+=("$PYTHON grouptc.py --model $m --dataset $d --data-dir $DATA_DIR --steps $STEPS --batch-size $BATCH_SIZE \
--group-size $gs --beta ${betas// /,} --gamma ${gammas// /,} --tc-level $tc --content-factors ${CONTENT[$d]} \
--latent-dim 10 --content-dims 5 --seed ${seeds// /,} --device $DEVICE --eval-samples $EVAL_SAMPLES \
--pairs $pairs ${kind:+--k $K }${METRICS:+--metrics $METRICS }--eval-every $EVAL_EVERY --log-every $LOG_EVERY \
--checkpoint-every $CHECKPOINT_EVERY --out $out")
}
emit() {  # emit DATASET MODEL GROUP_SIZE TC_LEVEL "BETAS" "GAMMAS" "SEEDS" [PAIRS]: their runs, at most SWEEP_SIZE
  local betas=($5) gammas=($6) seeds=($7) pairs=${8:-groups} i j k s b  # a process
  local per=$(( ${#betas[@]} * ${#gammas[@]} ))
  if [ "$per" -le "$SWEEP_SIZE" ]; then  # every setting, as many seeds as fit
    k=$(( SWEEP_SIZE / per ))
    for ((i = 0; i < ${#seeds[@]}; i += k)); do add "$1" "$2" "$3" "$4" "$5" "$6" "${seeds[*]:i:k}" "$pairs"; done
  elif [ "${#gammas[@]}" -le "$SWEEP_SIZE" ]; then  # one seed, as many betas as fit
    k=$(( SWEEP_SIZE / ${#gammas[@]} ))
    for s in "${seeds[@]}"; do
      for ((i = 0; i < ${#betas[@]}; i += k)); do add "$1" "$2" "$3" "$4" "${betas[*]:i:k}" "$6" "$s" "$pairs"; done
    done
  else  # one seed and one beta, gammas in chunks
    for s in "${seeds[@]}"; do for b in "${betas[@]}"; do
      for ((j = 0; j < ${#gammas[@]}; j += SWEEP_SIZE)); do
        add "$1" "$2" "$3" "$4" "$b" "${gammas[*]:j:SWEEP_SIZE}" "$s" "$pairs"
      done
    done; done
  fi
}

for d in "${DATASETS[@]}"; do
  # One run a process (SWEEP_SIZE=1): seed by seed, so that the first seeds of every setting finish first.
  if [ "$SWEEP_SIZE" -eq 1 ]; then seed_sets=("${SEEDS[@]}"); else seed_sets=("${SEEDS[*]}"); fi
  for seeds in "${seed_sets[@]}"; do
    if [ -n "$TCVAE_PAIRS" ]; then  # the listed (beta, gamma) pairs, each over the seeds
      for bg in "${TCVAE_SETTINGS[@]}"; do emit "$d" group_tcvae 2 inter "${bg%%:*}" "${bg##*:}" "$seeds"; done
    else
      emit "$d" group_tcvae 2 inter "${TCVAE_BETAS[*]}" "${TCVAE_GAMMAS[*]}" "$seeds"
    fi
    emit "$d" mlvae 2 inter "${MLVAE_BETAS[*]}" 0 "$seeds"
    emit "$d" gvae 2 inter "${GVAE_BETAS[*]}" 0 "$seeds"
    for gs in "${GROUP_SIZES[@]}"; do
      emit "$d" mlvae "$gs" inter "${MLVAE_BETAS[0]}" 0 "$seeds"
      emit "$d" gvae "$gs" inter "${GVAE_BETAS[0]}" 0 "$seeds"
    done
    for tc in "${TC_LEVELS[@]}"; do emit "$d" group_tcvae 2 "$tc" "$ABLATION_BETA" "$ABLATION_GAMMA" "$seeds"; done
    for m in "${ADA_MODELS[@]}"; do for p in "${PAIRS[@]}"; do
      emit "$d" "$m" 2 inter "${ADA_BETAS[*]}" 0 "$seeds" "$p"
    done; done
  done
done

# Every command through the program's own parser and checks (EVAL_SAMPLES against the data set's size, DEVICE, K
# against its factors, ...), so that a bad value stops the grid here rather than failing each of its runs; METRICS
# first, with its own message.
[ ${#CMDS[@]} -gt 0 ] ||
  die "the grid is empty: the lists give no run of ONLY_MODELS (${ONLY_MODELS[*]}); is ADA_MODELS none?"
printf '%s\n' "${CMDS[@]}" | "$PYTHON" -c 'import argparse, shlex, sys, grouptc
if sys.argv[1]:
    try:
        grouptc.parse_metrics(sys.argv[1])
    except argparse.ArgumentTypeError:
        sys.exit(f"run_paper.sh: METRICS must be all or a comma list of grouptc.py'"'"'s metrics (see its --help at "
                 f"--metrics), got {sys.argv[1]!r}")
for line in sys.stdin:
    argv = shlex.split(line)
    try:
        grouptc.expand(grouptc.parse_args(argv[argv.index("grouptc.py") + 1:]))
    except grouptc.UserError as error:
        sys.exit(f"run_paper.sh: a command of the grid is refused: {error}")' "$METRICS" || exit 2

if [ -n "${DRY_RUN:-}" ]; then
  printf '%s\n' "${CMDS[@]}"
  exit 0
fi
if [ -n "${COUNT:-}" ]; then
  echo "${#CMDS[@]}"
  exit 0
fi

finished() {  # finished INDEX: every run of entry INDEX evaluated at STEPS (its metrics.json says so)
  local m
  for m in ${MEMBERS[$1]}; do grep -Eqs "^ *\"steps\": $STEPS,?\$" "$m/metrics.json" || return 1; done
}

stopping="" child=""  # a worker's: the grid is stopping; the run it waits for
run_entry() {  # run_entry INDEX ENV_PREFIX: run entry INDEX unless it is finished or another process holds it
  local log=${LOGS[$1]} rc m resume=""
  finished "$1" && return 0
  [ -z "$stopping" ] || return 130  # the grid is stopping: no run starts
  for m in ${MEMBERS[$1]}; do [ -e "$m/config.json" ] || [ -e "$m/checkpoint.pt" ] && resume=" --resume"; done
  mkdir -p "$(dirname "$log")"
  echo "[$(date +%H:%M:%S)] start $log" >&2
  env $2 bash -c "${CMDS[$1]}$resume" >>"$log" 2>&1 &
  child=$!
  until rc=0; wait "$child" || rc=$?; ! kill -0 "$child" 2>/dev/null; do :; done  # a stop's trap ends a wait early
  child=""
  case $rc in
    0) echo "[$(date +%H:%M:%S)] done  $log" >&2 ;;
    3) echo "[$(date +%H:%M:%S)] skip  $log (another process is training it)" >&2 ;;
    130|143) echo "[$(date +%H:%M:%S)] stop  $log (interrupted: checkpointed if it had begun to train; run this" \
                  "script again to continue)" >&2 ;;
    *) echo "[$(date +%H:%M:%S)] FAILED $log (see it)" >&2 ;;
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

worker() {  # worker ENV_PREFIX: every entry in turn; a held or finished one is passed by; an interrupted one stops it
  local i rc
  # The grid's stop (passed on by the script, or a cancel's SIGTERM to every process): the run it waits for gets
  # SIGTERM (it checkpoints after its current step; one stop that reaches it twice within a second is one stop), and
  # no other run starts. SIGTERM, not SIGINT: a background job's shell and a starting Python ignore SIGINT.
  trap 'stopping=1; [ -z "$child" ] || kill -TERM "$child" 2>/dev/null' INT TERM
  for i in "${!CMDS[@]}"; do
    rc=0; run_entry "$i" "$1" || rc=$?
    [ -z "$stopping" ] && [ "$rc" -ne 130 ] || return 130
  done
}

echo "run_paper.sh: $(wc -w <<<"${MEMBERS[*]}") runs in ${#CMDS[@]} processes, in $RUNS_DIR" >&2
mkdir -p "$RUNS_DIR"
WORKERS=()
stop_grid() {  # a terminal's Ctrl-C, or kill -INT / -TERM of this script alone: passed on to every worker
  echo "run_paper.sh: interrupted; each run checkpoints after its current step and stops. Run this script again" \
    "to continue" >&2
  local w
  for w in "${WORKERS[@]}"; do kill -TERM "$w" 2>/dev/null; done  # again, a second or more later: at once
  wait
  exit 130
}
trap stop_grid INT TERM
if [ ${#GPUS[@]} -gt 0 ]; then
  for gpu in "${GPUS[@]}"; do worker "CUDA_VISIBLE_DEVICES=$gpu" & WORKERS+=($!); done
else
  threads=${OMP_NUM_THREADS:-$(( $(nproc) / JOBS ))}; [ "$threads" -ge 1 ] || threads=1  # set: yours
  for _ in $(seq "$JOBS"); do worker "OMP_NUM_THREADS=$threads" & WORKERS+=($!); done
fi
wait
left=0
for i in "${!CMDS[@]}"; do finished "$i" || left=$((left + 1)); done
if [ "$left" -gt 0 ]; then
  echo "run_paper.sh: $left of ${#CMDS[@]} processes are not finished (failed, or still training in another process);" \
    "no summary yet. Run this script again, or when all are done: $PYTHON grouptc.py --summarize $RUNS_DIR" >&2
  exit 1
fi
$PYTHON grouptc.py --summarize "$RUNS_DIR"
