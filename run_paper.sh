#!/usr/bin/env bash
# run_paper.sh: the paper's grid of runs, one grouptc.py process per run, then compare.py's summary.
#
# Reproduces, on each data set in DATASETS:
#   Figure 4   density of MIG and group-MIG over all runs of group-tcVAE, MLVAE and GVAE
#   Figure 3b  group-MIG of content vs non-content factors over the baselines' runs
#   Figure 3c  MIG of MLVAE and GVAE against the number of observations sharing a group
#   ablation   (not in the paper) group-tcVAE at one setting with each of the three TC levels
#   Ada        (not in the paper) Ada-GVAE and Ada-ML-VAE (Locatello et al. 2020), which infer what a pair shares
# and results.md, by `python compare.py summarize RUNS_DIR` (into RUNS_DIR/summary/) once every run is finished.
#
# Size of the full grid, per data set:
#   group-tcVAE  beta {10,20,30,40,50,100} x gamma {1,8,16,32,64} x 5 seeds ..... 150 runs
#   MLVAE, GVAE  beta {1,2,4,6,8,16} x 5 seeds (Locatello et al. 2020) ......... 60 runs
#   Figure 3c    MLVAE, GVAE at group size 3, 5, 10 (2 is in the line above) ... 30 runs
#   ablation     TC levels inter_intra, full at (ABLATION_BETA, ABLATION_GAMMA) .. 10 runs
#   Ada          Ada-GVAE, Ada-ML-VAE: beta {1,2,4,6,8,16} x 5 seeds x PAIRS ..... 60 runs
#   = 310 runs per data set, 620 processes for dsprites and shapes3d, 300,000 steps each.
# GPU time, from steps measured on one H100 running one process (benchmarks/gpu.sh, docs/speed.md): group-tcVAE
# 2.05 ms/step (10.3 min a run), MLVAE/GVAE 1.4 ms/step (7 min a run) at 32 pairs, the Ada models as MLVAE/GVAE (not
# measured); per data set 160 group-tcVAE runs and 150 others = about 45 GPU-hours, about 90 for both data sets, plus
# a few seconds of evaluation per run. Groups of 3 to 10 and 3D Shapes' 3 channels make some steps longer (not
# measured: count more). Several processes per GPU (PER_GPU) are not measured yet (benchmarks/gpu.sh, per_gpu).
# Each process holds its own copy of the data on its GPU, as uint8: dSprites about 2.8 GiB (737,280 x 64 x 64), 3D
# Shapes about 5.5 GiB (480,000 x 64 x 64 x 3); the built-in renderers (*_procedural) hold none. With about half a GiB
# of CUDA context and a few hundred MiB of networks, optimiser and activations each, an 80 GB GPU holds about 20
# dSprites processes or 12 3D Shapes ones (estimated). Their kernels overlap only under NVIDIA's MPS daemon, started
# with `nvidia-cuda-mps-control -d` (stopped with `echo quit | nvidia-cuda-mps-control`); not measured here.
#
# Usage:
#   DRY_RUN=1 bash run_paper.sh             # print one command per run (shell-quoted, runnable), run nothing
#   COUNT=1 bash run_paper.sh               # print the number of entries of a SLURM array (0 .. COUNT-1)
#   JOBS=2 bash run_paper.sh                # CPU: JOBS runs at a time, the cores' threads shared among them
#                                           # (or OMP_NUM_THREADS each, when set: two scripts on one machine)
#   GPUS="0 1" bash run_paper.sh            # one run at a time on each listed GPU
#   PER_GPU=4 bash run_paper.sh             # 4 at a time on each GPU (GPUS, else CUDA_VISIBLE_DEVICES's, else all)
#   METRICS=all bash run_paper.sh           # also score each finished run: compare.py score RUN --metrics ...
#                                           # (all: dci,sap,modularity,factor_vae; or a comma list of them)
#   sbatch --array=0-619%16 --gres=gpu:1 run_paper.sh              # SLURM: task i trains entry i of DRY_RUN's list
#   PER_TASK=10 sbatch --array=0-61%16 --gres=gpu:1 run_paper.sh   # ... or 10 runs a task, one after another
#   python compare.py summarize runs/paper  # ... then the summary, once every task has finished
# The CPU studies' settings: docs/cpu_study/README.md, docs/cpu_study_30k/README.md.
# Every run has one folder, RUNS_DIR/DATASET/NAME (NAME: grouptc.py's run_name()), its output in RUNS_DIR/logs/NAME.log.
# Finished runs (evaluated at STEPS, as their metrics.json says; with METRICS, scored) are skipped, interrupted ones
# resumed. A run folder is held by the process training it (an OS lock), so several run_paper.sh, on one machine or
# several sharing RUNS_DIR, never train a run twice: one that finds a run held passes it by (a line names it), and
# the last to see every run finished writes the summary. Ctrl-C or SIGTERM (scancel) stops the grid: each run
# checkpoints after its current step, none starts, exit 130; run it again to continue. Exit status: 0 done (or runs
# left to others), 1 a run failed (see its log), 2 a setting refused. No value is ever run as shell. Under SLURM,
# submit from the repository's folder with the same overrides set.
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
words() {  # words NAME [DEFAULT]: NAME's blank-separated words as an array (unset: DEFAULT), never globbed or run
  local text=${!1-${2-}}
  read -rd '' -a "$1" <<<"$text" || true
}
list() {  # list NAME DEFAULT: words; set to nothing is an error (not the whole grid by surprise)
  words "$1" "$2"
  local -n given=$1
  [ ${#given[@]} -gt 0 ] || die "$1 is set but empty; unset it for the paper's values, or list some"
}
match() {  # match REGEX MESSAGE VALUE...: each VALUE matches, or MESSAGE (a printf format of the value) and exit 2
  local re=$1 message=$2 v
  shift 2
  for v; do [[ $v =~ $re ]] || { printf -v message "$message" "$v"; die "$message"; }; done
}

words PY "${PYTHON:-python}"  # may carry flags: PYTHON="python3 -X dev"
RUNS_DIR=${RUNS_DIR-runs/paper}
DATA_DIR=${DATA_DIR-data}
list DATASETS "dsprites shapes3d"
list SEEDS "0 1 2 3 4"
STEPS=${STEPS-300000}
BATCH_SIZE=${BATCH_SIZE-32}
list TCVAE_BETAS "10 20 30 40 50 100"
list TCVAE_GAMMAS "1 8 16 32 64"
words TCVAE_SETTINGS  # "BETA:GAMMA ..." pairs instead of the product TCVAE_BETAS x TCVAE_GAMMAS
list BASE_BETAS "1 2 4 6 8 16"
list MLVAE_BETAS "${BASE_BETAS[*]}"  # one baseline's betas apart from the other's (default: BASE_BETAS)
list GVAE_BETAS "${BASE_BETAS[*]}"
list ADA_MODELS "ada_gvae ada_mlvae"  # Locatello et al. 2020's models (infer what a pair shares), or none
list ADA_BETAS "1 2 4 6 8 16"  # the weak-supervision grid of a disentanglement_lib fork
list PAIRS groups  # the Ada models' pairs: groups (the paper's), k_factors (DL's), k_factors_exact
K=${K-rnd}  # k-factor pairs: factors resampled per pair, or rnd
list ONLY_MODELS "group_tcvae mlvae gvae ada_gvae ada_mlvae"  # the part of the grid to run: these models'
list GROUP_SIZES "2 3 5 10"
list TC_LEVELS "inter inter_intra full"
ABLATION_BETA=${ABLATION_BETA-10}
ABLATION_GAMMA=${ABLATION_GAMMA-8}
DEVICE=${DEVICE-auto}
EVAL_SAMPLES=${EVAL_SAMPLES-10000}
EVAL_EVERY=${EVAL_EVERY-0}  # steps between evaluations during training (scores.csv); 0: only at the end
METRICS=${METRICS-}  # the field's scores added by compare.py to each finished run; unset: MIG, group-MIG only
CHECKPOINT_EVERY=${CHECKPOINT_EVERY-5000}
JOBS=${JOBS-1}
words GPUS
PER_TASK=${PER_TASK-1}  # runs per SLURM array entry, trained one after another

# Check every setting before anything runs.
for v in STEPS BATCH_SIZE JOBS CHECKPOINT_EVERY PER_TASK ${LOG_EVERY+LOG_EVERY} ${PER_GPU+PER_GPU}; do
  match '^[1-9][0-9]{0,17}$' "$v must be a positive whole number, got '%s'" "${!v}"
done
LOG_EVERY=${LOG_EVERY-$(( STEPS / 10 < 1 ? 1 : STEPS / 10 > 500 ? 500 : STEPS / 10 ))}  # grouptc.py's default
match '^([1-9][0-9]{0,5})?$' "OMP_NUM_THREADS must be a positive whole number when set, got '%s'" "${OMP_NUM_THREADS:-}"
match '^[0-9]{1,18}$' "EVAL_SAMPLES must be a whole number (0: every point), got '%s'" "$EVAL_SAMPLES"
match '^[0-9]{1,18}$' "EVAL_EVERY must be a whole number (0: only at the end), got '%s'" "$EVAL_EVERY"
match '^[0-9]{1,10}$' "SEEDS must be whole numbers (up to 10 digits), got '%s'" "${SEEDS[@]}"
match '^[^[:space:]]*$' "METRICS is one comma list without spaces (all, or e.g. dci,sap), got '%s'" "$METRICS"
match '^(|all|(dci|sap|modularity|factor_vae)(,(dci|sap|modularity|factor_vae))*)$' \
  "METRICS must be all or a comma list of compare.py's metrics (dci, sap, modularity, factor_vae), got '%s'" "$METRICS"
SCORES=()  # what METRICS asks compare.py for
[ "$METRICS" = all ] && SCORES=(dci sap modularity factor_vae) || IFS=, read -ra SCORES <<<"$METRICS"
NUM='[0-9]+([.][0-9]+)?'
match "^$NUM\$" "betas and gammas must be non-negative numbers, got '%s'" "${TCVAE_BETAS[@]}" "${TCVAE_GAMMAS[@]}" \
  "${MLVAE_BETAS[@]}" "${GVAE_BETAS[@]}" "${ADA_BETAS[@]}" "$ABLATION_BETA" "$ABLATION_GAMMA"
match "^$NUM:$NUM\$" "TCVAE_SETTINGS takes BETA:GAMMA pairs, got '%s'" "${TCVAE_SETTINGS[@]}"
match '^([2-9]|[1-9][0-9]{1,8})$' "GROUP_SIZES must be whole numbers >= 2, got '%s'" "${GROUP_SIZES[@]}"
[ "${ADA_MODELS[*]}" = none ] && ADA_MODELS=()  # none: no Ada runs
match '^(group_tcvae|mlvae|gvae|ada_gvae|ada_mlvae)$' "ONLY_MODELS: unknown model '%s'" "${ONLY_MODELS[@]}"
match '^ada_(gvae|mlvae)$' "ADA_MODELS: unknown model '%s' (ada_gvae, ada_mlvae, or none)" "${ADA_MODELS[@]}"
match '^(groups|k_factors|k_factors_exact)$' "PAIRS: unknown kind '%s' (groups, k_factors, k_factors_exact)" \
  "${PAIRS[@]}"
match '^(rnd|[1-9][0-9]{0,5})$' "K must be rnd or a positive whole number, got '%s'" "$K"
match '^(inter|inter_intra|full)$' "TC_LEVELS: unknown level '%s' (inter, inter_intra, full)" "${TC_LEVELS[@]}"
match '^(dsprites|shapes3d)(_procedural)?$' \
  "unknown data set '%s' in DATASETS (dsprites, shapes3d, dsprites_procedural, shapes3d_procedural)" "${DATASETS[@]}"
match . "RUNS_DIR is empty%s" "$RUNS_DIR"
match . "DATA_DIR is empty%s" "$DATA_DIR"
if [ -n "${PER_GPU:-}" ] && [ ${#GPUS[@]} -eq 0 ]; then  # every visible GPU
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    IFS=, read -ra GPUS <<<"$CUDA_VISIBLE_DEVICES"
  else
    mapfile -t GPUS < <(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null || true)
  fi
  [ ${#GPUS[@]} -gt 0 ] || die "PER_GPU: no GPU is visible (nvidia-smi lists none); name them in GPUS"
fi
match '^[[:alnum:]:_-]+$' "GPUS: '%s' is not a GPU's index or UUID" "${GPUS[@]}"

# The grid: every run as grouptc.py's flags, seed by seed so that the first seeds of every setting finish first.
R_DATA=() R_MODEL=() R_GS=() R_TC=() R_BETA=() R_GAMMA=() R_SEED=() R_PAIRS=()
add() {  # add DATASET MODEL GROUP_SIZE TC_LEVEL BETA GAMMA SEED [PAIRS]: a run, if ONLY_MODELS has MODEL
  [[ " ${ONLY_MODELS[*]} " == *" $2 "* ]] || return 0
  R_DATA+=("$1") R_MODEL+=("$2") R_GS+=("$3") R_TC+=("$4") R_BETA+=("$5") R_GAMMA+=("$6") R_SEED+=("$7")
  R_PAIRS+=("${8:-groups}")
}
for d in "${DATASETS[@]}"; do for s in "${SEEDS[@]}"; do
  if [ ${#TCVAE_SETTINGS[@]} -gt 0 ]; then  # the listed (beta, gamma) pairs
    for bg in "${TCVAE_SETTINGS[@]}"; do add "$d" group_tcvae 2 inter "${bg%%:*}" "${bg##*:}" "$s"; done
  else
    for b in "${TCVAE_BETAS[@]}"; do
      for g in "${TCVAE_GAMMAS[@]}"; do add "$d" group_tcvae 2 inter "$b" "$g" "$s"; done
    done
  fi
  for b in "${MLVAE_BETAS[@]}"; do add "$d" mlvae 2 inter "$b" 0 "$s"; done
  for b in "${GVAE_BETAS[@]}"; do add "$d" gvae 2 inter "$b" 0 "$s"; done
  for gs in "${GROUP_SIZES[@]}"; do  # Figure 3c, each baseline at its first beta (group size 2: listed above)
    add "$d" mlvae "$gs" inter "${MLVAE_BETAS[0]}" 0 "$s"
    add "$d" gvae "$gs" inter "${GVAE_BETAS[0]}" 0 "$s"
  done
  for tc in "${TC_LEVELS[@]}"; do add "$d" group_tcvae 2 "$tc" "$ABLATION_BETA" "$ABLATION_GAMMA" "$s"; done
  for m in "${ADA_MODELS[@]}"; do for p in "${PAIRS[@]}"; do
    for b in "${ADA_BETAS[@]}"; do add "$d" "$m" 2 inter "$b" 0 "$s" "$p"; done
  done; done
done; done
[ ${#R_MODEL[@]} -gt 0 ] ||
  die "the grid is empty: the lists give no run of ONLY_MODELS (${ONLY_MODELS[*]}); is ADA_MODELS none?"

flags() {  # flags I: ARGS, grouptc.py's flags for run I, each given (--out once its NAME is known)
  ARGS=(--model "${R_MODEL[$1]}" --dataset "${R_DATA[$1]}" --data-dir "$DATA_DIR" --steps "$STEPS" --batch-size
        "$BATCH_SIZE" --group-size "${R_GS[$1]}" --beta "${R_BETA[$1]}" --gamma "${R_GAMMA[$1]}" --tc-level
        "${R_TC[$1]}" --latent-dim 10 --content-dims 5 --seed "${R_SEED[$1]}" --device "$DEVICE" --eval-samples
        "$EVAL_SAMPLES" --pairs "${R_PAIRS[$1]}" --eval-every "$EVAL_EVERY" --log-every "$LOG_EVERY"
        --checkpoint-every "$CHECKPOINT_EVERY")
  [ "${R_PAIRS[$1]}" = groups ] || ARGS+=(--k "$K")
  [ -z "${NAMES[$1]:-}" ] || ARGS+=(--out "$RUNS_DIR/${R_DATA[$1]}/${NAMES[$1]}")
}
# One Python call: no list names a value twice (numbers compared exactly: 1 and 1.0 are one run), and every
# command passes grouptc.py's own parser and checks (EVAL_SAMPLES against the data set's size, DEVICE, K against its
# factors, ...), so that a bad value stops the grid here, not in each run. It prints each run's name, run_name().
CHECK='import os, sys
exact = lambda t: repr(float(t)).removesuffix(".0")
for name, _, text in (arg.partition("=") for arg in sys.argv[1:]):
    norm = {"SEEDS": int, "GROUP_SIZES": int, "TCVAE_SETTINGS": lambda t: ":".join(map(exact, t.split(":")))}.get(
        name, exact if name.endswith(("BETAS", "GAMMAS")) else str)
    values = [str(norm(word)) for word in text.split()]
    if twice := [v for v in values if values.count(v) > 1]:
        sys.exit(f"run_paper.sh: {name} lists {twice[0]!r} twice (numbers compared exactly); list each value once")
import grouptc
words, i = sys.stdin.buffer.read().split(b"\0"), 0
while i < len(words) - 1:
    argv, i = [os.fsdecode(w) for w in words[i + 1:i + 1 + int(words[i])]], i + 1 + int(words[i])
    try:
        print(grouptc.run_name(grouptc.check_args(grouptc.parse_args(argv))))
    except grouptc.UserError as error:
        sys.exit(f"run_paper.sh: a command of the grid is refused: {error}")'
LISTS=()
for v in DATASETS SEEDS BASE_BETAS TCVAE_BETAS TCVAE_GAMMAS TCVAE_SETTINGS MLVAE_BETAS GVAE_BETAS ADA_MODELS \
  ADA_BETAS PAIRS ONLY_MODELS GROUP_SIZES TC_LEVELS GPUS; do declare -n values=$v; LISTS+=("$v=${values[*]}"); done
names=$(for i in "${!R_MODEL[@]}"; do flags "$i"; printf '%s\0' "${#ARGS[@]}" "${ARGS[@]}"; done |
        "${PY[@]}" -c "$CHECK" "${LISTS[@]}") || exit 2
mapfile -t NAMES <<<"$names"
[ ${#NAMES[@]} -eq ${#R_MODEL[@]} ] || die "could not check the grid's commands with ${PY[*]}"
RUNS=()  # each run once (the ablation at TC inter, or Figure 3c at group size 2, can be one of the grid's)
declare -A LISTED=()
for i in "${!NAMES[@]}"; do [ -n "${LISTED[${NAMES[$i]}]:-}" ] || RUNS+=("$i"); LISTED[${NAMES[$i]}]=1; done
ENTRIES=$(( (${#RUNS[@]} + PER_TASK - 1) / PER_TASK ))
if [ -n "${DRY_RUN:-}" ]; then
  for i in "${RUNS[@]}"; do flags "$i"; printf -v line '%q ' "${PY[@]}" grouptc.py "${ARGS[@]}"; echo "${line% }"; done
  exit 0
fi
[ -z "${COUNT:-}" ] || { echo "$ENTRIES"; exit 0; }

# Running TODO's runs, a task at a time in each slot (a GPU's, or one of JOBS on the CPU): train a run (--resume
# where its folder holds one), or score a trained one with compare.py (a run just trained first).
dir() { RUN_DIR=$RUNS_DIR/${R_DATA[$1]}/${NAMES[$1]}; }
finished() { dir "$1"; grep -Eqs "^ *\"steps\": $STEPS,?\$" "$RUN_DIR/metrics.json"; }  # evaluated at STEPS
scored() {  # scored I: run I's metrics.json lists every metric of METRICS as done
  local m listed
  dir "$1"
  listed=$(awk '/^ *"metrics": \[/ {f = 1} f {print} f && /\]/ {exit}' "$RUN_DIR/metrics.json" 2>/dev/null)
  for m in "${SCORES[@]}"; do [[ $listed == *"\"$m\""* ]] || return 1; done
}
note() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
SLOTS=()
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then  # an array task: its entry's runs one after another; no summary
  i=$SLURM_ARRAY_TASK_ID
  [[ $i =~ ^[0-9]{1,9}$ ]] && [ "$i" -lt "$ENTRIES" ] ||
    die "SLURM_ARRAY_TASK_ID $i is not an entry (0..$(( ENTRIES - 1 )))"
  TODO=("${RUNS[@]:i * PER_TASK:PER_TASK}") SLOTS=("")
  THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-$(nproc)}}
else
  TODO=("${RUNS[@]}")
  for g in "${GPUS[@]}"; do for _ in $(seq "${PER_GPU:-1}"); do SLOTS+=("$g"); done; done
  [ ${#GPUS[@]} -gt 0 ] || for _ in $(seq "$JOBS"); do SLOTS+=(""); done
  n=$(( $(nproc) / ${#SLOTS[@]} )); THREADS=${OMP_NUM_THREADS:-$(( n > 1 ? n : 1 ))}  # set: yours
fi
set +e  # from here on each status is looked at: a command that Ctrl-C kills must not end the script before its runs
FREE=("${!SLOTS[@]}") SCOREQ=() LEFT=() FAILED=() next=0 stopping=""
declare -A TASK=()  # a running process -> "SLOT RUN KIND"
pick() {  # pick: RUN and KIND of the next task; status 1 when none is left
  while [ ${#SCOREQ[@]} -gt 0 ] || [ "$next" -lt ${#TODO[@]} ]; do
    if [ ${#SCOREQ[@]} -gt 0 ]; then RUN=${SCOREQ[0]} KIND=score; SCOREQ=("${SCOREQ[@]:1}"); return 0; fi
    RUN=${TODO[next]} KIND=train; next=$(( next + 1 ))
    if finished "$RUN"; then scored "$RUN" && continue; KIND=score; fi
    return 0
  done
  return 1
}
launch() {  # launch SLOT: start the picked task in SLOT, its output appended to the run's log
  local env=(OMP_NUM_THREADS="$THREADS") cmd
  [ -z "${SLOTS[$1]}" ] || env+=(CUDA_VISIBLE_DEVICES="${SLOTS[$1]}")
  dir "$RUN"
  cmd=(compare.py score "$RUN_DIR" --metrics "$(IFS=,; echo "${SCORES[*]}")")
  if [ "$KIND" = train ]; then
    flags "$RUN"
    cmd=(grouptc.py "${ARGS[@]}")
    [ ! -e "$RUN_DIR/config.json" ] && [ ! -e "$RUN_DIR/checkpoint.pt" ] || cmd+=(--resume)
  fi
  mkdir -p "$RUNS_DIR/logs"
  note "$KIND ${NAMES[$RUN]}${SLOTS[$1]:+ (GPU ${SLOTS[$1]})}"
  env "${env[@]}" "${PY[@]}" "${cmd[@]}" >>"$RUNS_DIR/logs/${NAMES[$RUN]}.log" 2>&1 &
  TASK[$!]="$1 $RUN $KIND"
}
ended() {  # ended PID STATUS
  local slot run kind
  read -r slot run kind <<<"${TASK[$1]}"
  unset "TASK[$1]"
  FREE+=("$slot")
  case $kind:$2 in
    train:0) note "done  ${NAMES[$run]}"
             [ ${#SCORES[@]} -eq 0 ] || ! finished "$run" || scored "$run" || SCOREQ+=("$run") ;;
    train:3) note "held  ${NAMES[$run]} (another process is training it: left to it)"; LEFT+=("${NAMES[$run]}") ;;
    *:130|*:143) note "stop  ${NAMES[$run]} (interrupted: checkpointed if it had begun to train)"; stop ;;
    score:0) note "scored ${NAMES[$run]}" ;;
    *) note "FAILED ${NAMES[$run]} (status $2: see $RUNS_DIR/logs/${NAMES[$run]}.log)"; FAILED+=("${NAMES[$run]}") ;;
  esac
}
stop() {  # the grid's stop (Ctrl-C, SIGTERM, or a run interrupted): every running task gets SIGTERM (it checkpoints
  # after its current step; a stop that reaches it twice within a second is one stop), and no task starts.
  # SIGTERM, not SIGINT: a background job ignores SIGINT until its Python takes it back.
  [ -n "$stopping" ] || echo "run_paper.sh: interrupted; each run checkpoints after its current step and stops." \
    "Run this script again to continue" >&2
  stopping=1
  for pid in "${!TASK[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap stop INT TERM
mkdir -p "$RUNS_DIR"
on=${GPUS[0]:+ (CUDA_VISIBLE_DEVICES ${SLOTS[*]})}
note "run_paper.sh: ${#TODO[@]} runs in $RUNS_DIR, ${#SLOTS[@]} at a time$on"
while :; do
  while [ -z "$stopping" ] && [ ${#FREE[@]} -gt 0 ] && pick; do
    launch "${FREE[0]}"
    FREE=("${FREE[@]:1}")
    [ -z "$stopping" ] || stop  # a stop that came while it started
  done
  [ ${#TASK[@]} -gt 0 ] || break
  sleep 0.2
  for pid in "${!TASK[@]}"; do
    kill -0 "$pid" 2>/dev/null && continue
    rc=0; wait "$pid" || rc=$?
    ended "$pid" "$rc"
  done
done
[ -z "$stopping" ] || exit 130
set -e
[ ${#LEFT[@]} -eq 0 ] || echo "run_paper.sh: left to the processes that hold them: ${LEFT[*]}" >&2
[ ${#FAILED[@]} -eq 0 ] ||
  { echo "run_paper.sh: ${#FAILED[@]} failed (see $RUNS_DIR/logs/NAME.log): ${FAILED[*]}" >&2; exit 1; }
[ -z "${SLURM_ARRAY_TASK_ID:-}" ] || exit 0  # the summary is its own step
left=0
for i in "${RUNS[@]}"; do finished "$i" && scored "$i" || left=$(( left + 1 )); done
if [ "$left" -gt 0 ]; then
  echo "run_paper.sh: $left of ${#RUNS[@]} runs are not finished yet (another process holds them): the last script" \
    "to finish writes the summary, or later: ${PY[*]} compare.py summarize $(printf %q "$RUNS_DIR")" >&2
  exit 0
fi
"${PY[@]}" compare.py summarize "$RUNS_DIR"
