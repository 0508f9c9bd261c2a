"""Tests for run_paper.sh (the paper's grid, one grouptc.py process per run), benchmarks/gpu_grid.sh, and the studies
(their commands, their runs computed again). Each starts scripts and processes, so each uses the fewest and the
smallest that keep its assertions meaningful; where running grouptc.py or compare.py is not the point, a stand-in
python records the commands instead. The slowest set-ups (@background) run beside the other tests.
Run: python -m pytest -q test_run_paper.py"""

import contextlib
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

import grouptc as gt
from conftest import background, kill_session, spawn

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "run_paper.sh"
SETTINGS = {"DATASETS", "SEEDS", "STEPS", "BATCH_SIZE", "TCVAE_BETAS", "TCVAE_GAMMAS", "TCVAE_SETTINGS", "BASE_BETAS",
            "MLVAE_BETAS", "GVAE_BETAS", "ADA_MODELS", "ADA_BETAS", "PAIRS", "K", "ONLY_MODELS", "GROUP_SIZES",
            "TC_LEVELS", "ABLATION_BETA", "ABLATION_GAMMA", "DEVICE", "EVAL_SAMPLES", "EVAL_EVERY", "LOG_EVERY",
            "CHECKPOINT_EVERY", "JOBS", "DRY_RUN", "COUNT", "RUNS_DIR", "DATA_DIR", "PYTHON", "METRICS", "GPUS",
            "PER_GPU", "PER_TASK", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS"}
BASE = {k: v for k, v in os.environ.items() if k not in SETTINGS and not k.startswith("SLURM_")}
# group-tcVAE (beta 10, gamma 1), MLVAE and GVAE at beta 1: three runs of 2 steps (ONLY_MODELS picks some)
TINY = {"STEPS": "2", "SEEDS": "0", "DATASETS": "dsprites_procedural", "TCVAE_SETTINGS": "10:1", "BASE_BETAS": "1",
        "GROUP_SIZES": "2", "TC_LEVELS": "inter", "ABLATION_GAMMA": "1", "ADA_MODELS": "none", "EVAL_SAMPLES": "100",
        "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
NAME = "{}_dsprites_procedural_beta{}_gamma{}_gs2_tc-inter{}_seed{}"  # model, beta, gamma, batch ('_bs4'), seed
GVAE = NAME.format("gvae", 1, 0, "", 0)


def run_paper(env, cwd=HERE, timeout=300):
    return subprocess.run(["bash", str(SCRIPT)], cwd=cwd, env=BASE | env, capture_output=True, text=True,
                          timeout=timeout)


def fake_python(folder):
    """A stand-in for python: grouptc.py and compare.py calls are recorded in folder/calls (each: what, the
    process's CUDA_VISIBLE_DEVICES, its words, NUL-separated) and faked (a run's metrics.json at its --steps; the
    scores compare.py was asked for, listed as done); anything else goes to the real python."""
    path = folder / "python"
    path.write_text(f"""#!/usr/bin/env bash
case ${{1:-}} in grouptc.py|compare.py) ;; *) exec {shlex.quote(sys.executable)} "$@" ;; esac
printf '%s\\0' "$1" "${{CUDA_VISIBLE_DEVICES-}}" "$#" "$@" >>{shlex.quote(str(folder / "calls"))}
sleep "${{FAKE_SLEEP:-0}}"
if [ "$1" = grouptc.py ]; then
  while [ $# -gt 0 ]; do case $1 in --out) out=$2 ;; --steps) steps=$2 ;; esac; shift; done
  mkdir -p "$out" && printf '{{\\n "metrics": [\\n  "mig"\\n ],\\n "steps": %s\\n}}\\n' "$steps" >"$out/metrics.json"
elif [ "$2" = score ]; then
  steps=$(grep -o '"steps": [0-9]*' "$3/metrics.json")
  printf '{{\\n "metrics": [\\n  "mig",\\n  "%s"\\n ],\\n %s\\n}}\\n' "${{5//,/\\",\\"}}" "$steps" >"$3/metrics.json"
fi
""")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def calls(folder):
    """The recorded calls: (what, CUDA_VISIBLE_DEVICES, words) each."""
    fields, out = (folder / "calls").read_bytes().split(b"\0")[:-1], []
    while fields:
        n = int(fields[2])
        out.append((fields[0].decode(), fields[1].decode(), [os.fsdecode(w) for w in fields[3:3 + n]]))
        fields = fields[3 + n:]
    return out


def out_of(words):
    return words[words.index("--out") + 1]


# ------------------------------------------------------------------------------------------------ the grid's list
def test_run_paper_dry_run_lists_the_whole_grid(tmp_path):
    """One shell-quoted command per run (620), runnable as printed, even with shell syntax in RUNS_DIR: given
    relative, from where the script is run."""
    runs = "runs/x $(touch${IFS}PWNED)`touch PWNED2`;*"
    out = run_paper({"DRY_RUN": "1", "RUNS_DIR": runs}, cwd=tmp_path).stdout.splitlines()
    assert len(out) == 620 and len(set(out)) == 620  # one process per run
    assert all(line.startswith("python grouptc.py --model ") for line in out)
    for line in out[::31]:  # every flag explicit; each at RUNS_DIR/DATASET/NAME, NAME grouptc's own
        a = gt.parse_args(shlex.split(line)[2:])
        assert len(a.given) >= 18 and a.out == str(tmp_path / runs / a.dataset / gt.run_name(a))
    assert not list(tmp_path.rglob("PWNED*")) and not list(HERE.glob("PWNED*"))
    runs = [dict(zip(words[2::2], words[3::2])) for words in map(shlex.split, out)]  # flag -> value
    count = lambda **want: sum(all(r[f"--{k.replace('_', '-')}"] == v for k, v in want.items()) for r in runs)  # noqa
    for d in ("dsprites", "shapes3d"):
        assert count(model="group_tcvae", dataset=d, tc_level="inter", group_size="2") == 150
        for m in ("mlvae", "gvae"):
            assert count(model=m, dataset=d, group_size="2") == 30
            for gs in ("3", "5", "10"):
                assert count(model=m, dataset=d, group_size=gs) == 5
        assert count(model="group_tcvae", dataset=d, tc_level="full") == 5
        for m in ("ada_gvae", "ada_mlvae"):  # Locatello et al. 2020's models, on the paper's group pairs
            assert count(model=m, dataset=d, pairs="groups") == 30
    bad = run_paper({"DRY_RUN": "1", "METRICS": "sap,dcx"})
    assert bad.returncode == 2 and "METRICS must be" in bad.stderr and not bad.stdout
    header = SCRIPT.read_text()
    assert "sbatch --array=0-619%" in header and "PER_TASK=10 sbatch --array=0-61%" in header  # 620, 62 entries


# ------------------------------------------------------------------------------------------------ a tiny grid, run
@background
def grid(tmp):
    """A one-run grid (GVAE, 2 steps) and two run_paper.sh on its RUNS_DIR: the first's run is held stopped
    (SIGSTOP) while it trains, the second runs whole meanwhile; then the first goes on and finishes."""
    runs = tmp / "runs"
    env = TINY | {"ONLY_MODELS": "gvae", "RUNS_DIR": str(runs)}
    start = lambda: spawn(["bash", str(SCRIPT)], cwd=HERE, env=BASE | env, stdout=subprocess.PIPE,  # noqa: E731
                          stderr=subprocess.PIPE, text=True)
    first, second, pid = start(), None, None
    try:
        deadline = time.time() + 120
        while pid is None:  # its grouptc.py, once it holds the run's folder
            assert time.time() < deadline and first.poll() is None
            with contextlib.suppress(OSError, IndexError, ValueError):
                holder = int((runs / "dsprites_procedural" / GVAE / ".lock").read_text().split()[1])
                if "grouptc.py" in Path(f"/proc/{holder}/cmdline").read_text():
                    os.kill(pid := holder, signal.SIGSTOP)
            time.sleep(0.02)
        second = start()
        second_out, second_err = second.communicate(timeout=300)
        os.kill(pid, signal.SIGCONT)
        first_out, first_err = first.communicate(timeout=300)
    finally:
        for p in (first, second):
            if p is not None:
                kill_session(p.pid, signal.SIGCONT)
                kill_session(p.pid, signal.SIGKILL)
    return {"runs": runs, "env": env, "first": (first.returncode, first_out, first_err),
            "second": (second.returncode, second_out, second_err)}


def test_two_run_paper_sh_on_one_runs_dir_never_train_a_run_twice(grid):
    """The second script finds the run held by the first's process: not a failure, it passes it by (exit 0, a line
    names the run left to the other) and writes no summary; the first, once it goes on, finishes the run and writes
    the summary (the last to see every run finished)."""
    rc, _, err = grid["second"]
    assert rc == 0 and f"held  {GVAE} (another process is training it" in err, err
    assert f"left to the processes that hold them: {GVAE}" in err and "1 of 1 runs are not finished yet" in err
    rc, out, err = grid["first"]
    assert rc == 0 and f"train {GVAE}" in err and f"done  {GVAE}" in err, err
    assert (grid["runs"] / "logs" / f"{GVAE}.log").read_text().count("training ") == 1  # trained by one process
    assert [r["step"] for r in gt.read_log(grid["runs"] / "dsprites_procedural" / GVAE / "log.csv")] == ["1", "2"]
    assert "wrote results.md" in err and "wrote results.md" not in grid["second"][2]


def test_a_tiny_grid_runs_through_run_paper_and_the_summary(grid, tmp_path):
    runs = grid["runs"]
    assert [f.name for f in (runs / "dsprites_procedural").iterdir()] == [GVAE]  # at DATASET/NAME
    assert gt.evaluated_at(runs / "dsprites_procedural" / GVAE) == 2
    assert (runs / "summary" / "figure4_dsprites_procedural.png").stat().st_size > 5_000
    table = (runs / "summary" / "results.md").read_text()
    assert "# Results: 1 runs" in table and "| gvae | 1 | 0 | 2 | 1 |" in table
    # Run again (as an array task: no summary) with the field's modularity asked for: the finished run is scored by
    # compare.py, not trained again
    shutil.copytree(runs, tmp_path / "runs", symlinks=True)
    run = tmp_path / "runs" / "dsprites_procedural" / GVAE
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "metrics.json"}
    again = run_paper(grid["env"] | {"RUNS_DIR": str(tmp_path / "runs"), "METRICS": "modularity",
                                     "SLURM_ARRAY_TASK_ID": "0"})
    assert again.returncode == 0 and f"score {GVAE}" in again.stderr and " train " not in again.stderr, again.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "metrics.json"} == before
    m = json.loads((run / "metrics.json").read_text())
    assert "modularity" in m["metrics"] and 0 <= m["modularity"] <= 1 and m["steps"] == 2


# ------------------------------------------------------------------------------------------------ stand-in runs
@pytest.fixture(scope="module")
def fake_grid(tmp_path_factory):
    """Four runs through run_paper.sh with the stand-in python: on two GPUs, two processes each, METRICS=all, and
    RUNS_DIR and DATA_DIR given relative, with blanks and shell syntax in them."""
    tmp = tmp_path_factory.mktemp("fake")
    env = TINY | {"SEEDS": "0 1", "ONLY_MODELS": "mlvae gvae", "GPUS": "0 1", "PER_GPU": "2", "METRICS": "all",
                  "RUNS_DIR": "runs/x $(touch${IFS}PWNED)`touch PWNED2`", "DATA_DIR": "d;touch PWNED3 *",
                  "PYTHON": fake_python(tmp), "FAKE_SLEEP": "0.3"}
    done = run_paper(env, cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"tmp": tmp, "env": env, "done": done, "calls": calls(tmp), "runs": tmp / "runs" / env["RUNS_DIR"][5:]}


def test_no_value_is_ever_run_as_shell(fake_grid):
    tmp, runs = fake_grid["tmp"], fake_grid["runs"]
    assert not list(tmp.rglob("PWNED*")) and not list(HERE.glob("PWNED*"))
    trained = [words for what, _, words in fake_grid["calls"] if what == "grouptc.py"]
    assert len(trained) == 4 and all(Path(out_of(w)).parent == runs / "dsprites_procedural" for w in trained)
    assert all(w[w.index("--data-dir") + 1] == str(tmp / "d;touch PWNED3 *") for w in trained)
    assert len(list((runs / "logs").glob("*.log"))) == 4


def test_a_grown_grid_trains_only_its_new_runs(fake_grid):
    tmp, runs = fake_grid["tmp"], fake_grid["runs"]
    grown = run_paper(fake_grid["env"] | {"SEEDS": "0 1 2"}, cwd=tmp)  # the finished runs start nothing
    assert grown.returncode == 0, grown.stderr
    made = [(what, Path(w[2] if what == "compare.py" else out_of(w)).name) for what, _, w in
            calls(tmp)[len(fake_grid["calls"]):]]
    new = {NAME.format("mlvae", 1, 0, "", 2), NAME.format("gvae", 1, 0, "", 2)}
    assert sorted(made[:2]) == sorted(("grouptc.py", name) for name in new)  # both at once
    assert sorted(made[2:4]) == sorted(("compare.py", name) for name in new) and made[4:] == [("compare.py", runs.name)]
    assert not list(tmp.rglob("PWNED*"))


def test_run_paper_takes_relative_folders_from_where_it_is_run(fake_grid):
    words = next(w for what, _, w in fake_grid["calls"] if what == "grouptc.py")  # run from fake_grid["tmp"]
    assert words[words.index("--data-dir") + 1] == str(fake_grid["tmp"] / fake_grid["env"]["DATA_DIR"])
    assert Path(out_of(words)).parent == fake_grid["tmp"] / fake_grid["env"]["RUNS_DIR"] / "dsprites_procedural"


def test_per_gpu_runs_that_many_processes_on_each_gpu(fake_grid):
    trained = [gpu for what, gpu, _ in fake_grid["calls"] if what == "grouptc.py"]
    assert sorted(trained) == ["0", "0", "1", "1"]  # all four at once (each takes 0.3 s), two on each GPU
    assert "4 runs in " in fake_grid["done"].stderr and "4 at a time (CUDA_VISIBLE_DEVICES 0 0 1 1)" in \
        fake_grid["done"].stderr


def test_metrics_all_scores_each_finished_run_with_compare_py_then_the_summary(fake_grid):
    made = [words for _, _, words in fake_grid["calls"]]
    trained = [i for i, words in enumerate(made) if words[0] == "grouptc.py"]
    scored = [i for i, words in enumerate(made) if words[:2] == ["compare.py", "score"]]
    assert len(trained) == len(scored) == 4
    for i in trained:  # each run, once trained, scored with all four of the field's metrics
        assert made.index(["compare.py", "score", out_of(made[i]), "--metrics", "dci,sap,modularity,factor_vae"]) > i
    assert made[-1] == ["compare.py", "summarize", str(fake_grid["runs"])]  # once every run is finished


def test_slurm_array_task_runs_one_entry_of_the_list(tmp_path):
    """Entries of PER_TASK=2 runs each (of mlvae, gvae at seeds 0, 1): task 1 trains entry 1's two runs, one after
    the other, and nothing else; the summary is a step of its own."""
    env = TINY | {"SEEDS": "0 1", "ONLY_MODELS": "mlvae gvae", "PER_TASK": "2", "RUNS_DIR": str(tmp_path / "runs"),
                  "PYTHON": fake_python(tmp_path), "SLURM_SUBMIT_DIR": str(HERE)}  # (COUNT: in the gpu_grid.sh test)
    task = run_paper(env | {"SLURM_ARRAY_TASK_ID": "1"})
    assert task.returncode == 0, task.stderr
    assert [(what, Path(out_of(w)).name) for what, _, w in calls(tmp_path)] == [
        ("grouptc.py", NAME.format("mlvae", 1, 0, "", 1)), ("grouptc.py", NAME.format("gvae", 1, 0, "", 1))]
    bad = run_paper(env | {"SLURM_ARRAY_TASK_ID": "2"})
    assert bad.returncode == 2 and "not an entry (0..1)" in bad.stderr  # COUNT=1 would print 2


# ------------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("env,message", [
    ({"STEPS": "3k"}, "STEPS must be a positive whole number"),
    ({"SEEDS": ""}, "SEEDS is set but empty"),
    ({"DATASETS": " "}, "DATASETS is set but empty"),
    ({"TC_LEVELS": "inter most"}, "unknown level 'most'"),
    ({"DATASETS": "mnist"}, "unknown data set 'mnist'"),
    ({"OMP_NUM_THREADS": "all"}, "OMP_NUM_THREADS must be a positive whole number"),
    ({"METRICS": "dci, sap"}, "METRICS is one comma list without spaces"),
    ({"SEEDS": "9" * 11}, "SEEDS must be whole numbers (up to 10 digits)"),
    ({"PER_GPU": "0", "GPUS": "0"}, "PER_GPU must be a positive whole number"),
    ({"GPUS": "0 $(x)"}, "GPUS: '$(x)' is not a GPU's index or UUID"),
    ({"ONLY_MODELS": "ada_gvae", "ADA_MODELS": "none"}, "the grid is empty: the lists give no run of ONLY_MODELS"),
    # the rest by the program's own checks, on every command of the grid (K: on the k-factor pairs' only)
    ({"K": "7", "PAIRS": "k_factors"}, "refused: --k must be rnd or 1 .. 4"),
])
def test_run_paper_checks_its_settings_up_front(tmp_path, env, message):
    done = run_paper({"RUNS_DIR": str(tmp_path / "runs"), "DRY_RUN": "1"} | env)
    assert done.returncode == 2 and message in done.stderr and done.stdout == "", done.stderr
    assert not (tmp_path / "runs").exists()


def test_run_paper_refuses_duplicates():
    for env, message in (({"BASE_BETAS": "1 1.0"}, "BASE_BETAS lists '1' twice"),
                         ({"SEEDS": "0 1 00"}, "SEEDS lists '0' twice"),
                         ({"TCVAE_BETAS": "0.1 0.10"}, "TCVAE_BETAS lists '0.1' twice")):
        done = run_paper(env | {"DRY_RUN": "1"})
        assert done.returncode == 2 and message in done.stderr, (env, done.stderr)


# ------------------------------------------------------------------------------------------------ stopping
@pytest.mark.parametrize("how", ["ctrl-c", "kill -TERM at start-up"])
def test_ctrl_c_stops_the_whole_run_paper_grid_after_a_checkpoint(tmp_path, how):
    """ctrl-c: a terminal's SIGINT to the script's process group, once the first run trains: it checkpoints and
    stops. At start-up: the script run in the background of another (SIGINT ignored) gets SIGTERM alone while the
    first run's Python starts: the script passes it on (the run dies before it has anything to save). Either way the
    grid's next run never starts and the script exits 130."""
    env = TINY | {"STEPS": "100000", "SEEDS": "0 1", "ONLY_MODELS": "gvae", "BATCH_SIZE": "4",
                  "CHECKPOINT_EVERY": "2", "LOG_EVERY": "2", "RUNS_DIR": str(tmp_path / "runs")}
    early = how.endswith("start-up")
    grid = subprocess.Popen(["bash", str(SCRIPT)], cwd=HERE, env=BASE | env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(
                                signal.SIGINT, signal.SIG_IGN if early else signal.SIG_DFL))
    log = tmp_path / "runs" / "logs" / f"{NAME.format('gvae', 1, 0, '_bs4', 0)}.log"
    try:
        deadline = time.time() + 120
        while not (log.exists() and (early or "step " in log.read_text())) and time.time() < deadline:
            time.sleep(0.02)
        if early:
            os.kill(grid.pid, signal.SIGTERM)
        else:
            os.killpg(grid.pid, signal.SIGINT)
        err = grid.communicate(timeout=120)[1]
    finally:  # nothing left running, whatever happened
        kill_session(grid.pid, signal.SIGKILL)
    assert grid.returncode == 130 and "interrupted; each run checkpoints" in err and "stop  " in err, err
    assert early != ("stopped at step" in log.read_text())  # it checkpointed; at start-up it had nothing to save
    assert early != (tmp_path / "runs" / "dsprites_procedural" / log.stem / "checkpoint.pt").exists()
    assert not log.with_name(log.name.replace("seed0", "seed1")).exists()  # the grid's next run never started


# ------------------------------------------------------------------------------------------------ gpu_grid.sh
GPU_GRID = {"DEVICE": "cpu", "PER_GPU": "1", "CAL_MODEL": "gvae", "CAL_S": "1", "CAL_LOG": "1", "QUANTUM": "2",
            "MAX_STEPS": "2", "TRAIN_S": "5", "SEEDS": "0", "ONLY_MODELS": "gvae", "BASE_BETAS": "1",
            "EVAL_SAMPLES": "100", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}  # tiny, on the CPU


@background
def gpu_grid(tmp):
    """benchmarks/gpu_grid.sh at tiny sizes on the CPU -> its environment."""
    env = GPU_GRID | {"RUNS_DIR": str(tmp / "runs"), "OUT": str(tmp / "out")}
    with spawn(["bash", "benchmarks/gpu_grid.sh"], cwd=HERE, env=BASE | env, stdout=subprocess.DEVNULL,
               stderr=subprocess.PIPE, text=True) as done:
        err = done.communicate(timeout=600)[1]
    assert done.returncode == 0, err[-3000:]
    return env


def test_the_gpu_grid_script_runs_whole_on_the_cpu(gpu_grid):
    """benchmarks/gpu_grid.sh at tiny sizes: calibration, training, evaluation, summary, and the files that come back
    from a device command; run again, it keeps its plan (device minutes are scarce: a broken script wastes them)."""
    env = gpu_grid
    out = Path(env["OUT"])
    assert sorted(p.name for p in out.iterdir()) == ["gpu_grid.tar.gz", "gpu_grid.txt", "results.md"]
    report = (out / "gpu_grid.txt").read_text()
    assert "PER_GPU=1: ms/step per process" in report and "STEPS=2 fit" in report
    assert "1 of 1 runs evaluated at 2 steps" in report
    with tarfile.open(out / "gpu_grid.tar.gz") as tar:
        names = tar.getnames()
    assert sum(n.endswith("metrics.json") for n in names) == 1 and not any(n.endswith(".pt") for n in names)
    assert "| gvae | 1 | 0 | 2 | 1 |" in (out / "results.md").read_text()
    # run again: its plan read back, not measured again; no time left to train: it says so
    again = subprocess.run(["bash", "benchmarks/gpu_grid.sh"], cwd=HERE, env=BASE | env | {"DEADLINE_S": "1"},
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "STEPS=2 (continuing)" in again.stderr
    assert "no time left before DEADLINE_S=1" in again.stderr and "calibration" not in again.stderr


# ------------------------------------------------------------------------------------------------ the studies
STUDY = json.loads((HERE / "fixtures" / "cpu_study_20_steps.json").read_text())
STUDY_XEON = json.loads((HERE / "fixtures" / "cpu_study_20_steps_intel_xeon.json").read_text())
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}  # torch's and oneDNN's kernels: AVX2 at most


@background
def study_runs(tmp):
    """The 20-step runs of the study's group-tcVAE (TC inter) and GVAE, in one fresh process (the caps act when torch
    loads), one thread, torch's and oneDNN's kernels capped at AVX2; no figures (not compared). -> their folder."""
    script = ("import json, sys, grouptc as gt\n"
              "gt.save_figure = lambda fig, path, dpi: gt._plt().close(fig)\n"
              "for name, argv in json.loads(sys.argv[1]).items():\n"
              "    assert gt.main(argv + ['--out', sys.argv[2] + '/' + name]) == 0\n")
    runs = {name: STUDY[name]["argv"] for name in ("group_tcvae_inter", "gvae")}  # the fixtures also hold TC full, MLVAE
    with spawn([sys.executable, "-c", script, json.dumps(runs), str(tmp)], cwd=HERE, stdout=subprocess.DEVNULL,
               stderr=subprocess.PIPE, text=True, env=os.environ | AVX2 | {"OMP_NUM_THREADS": "1"}) as done:
        err = done.communicate(timeout=600)[1]
    assert done.returncode == 0, err[-2000:]
    return tmp


@pytest.mark.parametrize("name", ["group_tcvae_inter", "gvae"])
def test_the_cpu_study_runs_are_computed_byte_for_byte(study_runs, name):
    """docs/cpu_study's runs were trained by the code of commit 42d6587 and again, for the metric suite, by that of
    dbba711 (which passes this test), one thread a run, with AVX2 kernels: 20-step runs with their flags (the study's
    data, batch and models, seed 1) write the log.csv and MI matrix that 42d6587 wrote (fixtures/). On an AVX-512
    processor torch and oneDNN pick other kernels (the log differs from step 5) unless both are capped at AVX2. So
    capped, an AMD EPYC computes what the study's machine computed; an Intel Xeon (AVX-512) still does not, except for
    MLVAE: on it the runs must write what this code wrote there on 2026-12-03 (fixtures/, the Xeon's file)."""
    run = study_runs / name
    rows = [{k: v for k, v in r.items() if k != "ms_per_step"} for r in gt.read_log(run / "log.csv")]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["torch_threads"] == [1]
    assert metrics["machines"] == [f"torch {torch.__version__}, CPU AVX2 ({gt.cpu_vendor()}), oneDNN up to AVX2"]
    xeon = gt.cpu_vendor() == "GenuineIntel" and "avx512f" in Path("/proc/cpuinfo").read_text().split()
    expected = STUDY_XEON[name] if xeon else STUDY[name]
    assert rows == expected["log"]
    assert metrics["mi_matrix"] == expected["mi_matrix"]


def study_commands(page):
    """The `VAR=value ... bash run_paper.sh` commands of a docs page's shell blocks (continued lines joined) -> their
    variables."""
    commands, joined, fence = [], "", False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
            continue
        if not fence:
            continue
        joined += line.rstrip("\\").strip() + " "
        if line.endswith("\\"):
            continue
        words = shlex.split(joined.partition("#")[0]) if "run_paper.sh" in joined else []
        if words[-2:] == ["bash", "run_paper.sh"] and all("=" in w for w in words[:-2]):
            commands.append(dict(w.split("=", 1) for w in words[:-2]))
        joined = ""
    return commands


@pytest.mark.parametrize("study", ["cpu_study", "cpu_study_30k"])
def test_the_studies_commands_list_the_runs_they_say(tmp_path, study):
    """A study page's commands, given to today's run_paper.sh, list exactly the runs committed under docs/STUDY/runs
    (whose names leave out the data set), so that a reader can run a study again as written."""
    names = []
    for env in study_commands(HERE / "docs" / study / "README.md"):
        env = {k: v for k, v in env.items() if k not in ("OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
        done = run_paper(env | {"RUNS_DIR": str(tmp_path / "r"), "DRY_RUN": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        names += [Path(shlex.split(line)[-1]).name for line in done.stdout.splitlines()]
    committed = sorted(p.name for p in (HERE / "docs" / study / "runs").iterdir() if p.is_dir())
    assert names and sorted(n.replace("_dsprites_procedural", "") for n in names) == committed
