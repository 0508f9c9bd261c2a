"""Steady training-step time of sweeps, as grouptc.py would train them: gpu_grid.sh's calibration.

    python benchmarks/time_sweeps.py --steps 200 "--model mlvae --beta 1,4,16 --seed 0,1" "--model gvae ..."
        each flag set in turn, in this process: prints "FLAGS<TAB>ms per step"
    python benchmarks/time_sweeps.py --steps 200 --barrier DIR --parties 3 "FLAGS"   (3 such processes at once)
        each process warms up, waits until all 3 are ready, times its steps, then steps on until all 3 are done

A flag set is what grouptc.py takes (one process: a run or a sweep). Warm-up covers the CUDA graph's capture.
"""

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grouptc as gt  # noqa: E402


def build(flags):
    """The runs of one grouptc.py command line (each checked as a run's flags), as that process trains them."""
    return gt.Sweep(gt.build_runs(gt.expand(gt.parse_args(shlex.split(flags) + ["--out", "unused"]))))


def time_steps(run, steps):
    device = run.runs[0].device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        run.train_step()
    sync()
    return 1000 * (time.perf_counter() - t0) / steps


def wait(args, what, run, limit_s=600):
    """Mark this process WHAT in the barrier folder, and step on (keeping the device as busy as it will be) until
    every party is; a party that died leaves the others an error after limit_s, not a hang."""
    (Path(args.barrier) / f"{what}.{os.getpid()}").touch()
    t0 = time.perf_counter()
    while len(list(Path(args.barrier).glob(f"{what}.*"))) < args.parties:
        if time.perf_counter() - t0 > limit_s:
            sys.exit(f"time_sweeps.py: after {limit_s} s only some of the {args.parties} processes are {what}")
        run.train_step()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("flag_sets", nargs="+", help="grouptc.py flags of one process each (quoted)")
    p.add_argument("--steps", type=int, default=200, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (CUDA graph capture after 3)")
    p.add_argument("--barrier", help="a folder shared by processes started together: time only once all are ready")
    p.add_argument("--parties", type=int, default=1, help="how many processes share --barrier")
    args = p.parse_args()
    for flags in args.flag_sets:
        run = build(flags)
        for _ in range(args.warmup):
            run.train_step()
        if args.barrier:
            Path(args.barrier).mkdir(parents=True, exist_ok=True)
            wait(args, "ready", run)
        ms = time_steps(run, args.steps)
        if args.barrier:  # keep stepping until the others are done timing, so that they time a busy GPU too
            wait(args, "done", run)
        print(f"{flags}\t{ms:.3f}", flush=True)
        del run
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
