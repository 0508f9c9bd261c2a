"""Writes docs/shapes3d_study/results.md and its figures from the committed runs, nothing typed in by hand.

    python docs/shapes3d_study/results.py        # from the repository's folder

First the paper's claim, per metric: group-tcVAE (beta 10, gamma 8, TC inter) against each baseline, over the seeds
both have finished, the means and their ratio (the paper: "at least 10%" more than MLVAE and GVAE on 3D Shapes),
each seed against the baseline's same seed, and whether every group-tcVAE run is ahead of every baseline run; then
where the differences come from, factor by factor; then both data sets' means side by side (the README's table);
then what `python compare.py summarize` writes for the runs (per model, per setting, each seed, per factor) and its
figures. Runs still training are left out.
"""
import contextlib
import io
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
import compare  # noqa: E402

LEAD = "group_tcvae_shapes3d_procedural_beta10_gamma8_gs2_tc-inter"
DSPRITES = HERE.parent / "cpu_study_30k" / "runs"  # the dSprites-like study at 30,000 steps (its names: no data set)
BASELINES = {"mlvae_shapes3d_procedural_beta1_gamma0_gs2_tc-inter": "MLVAE 1",
             "gvae_shapes3d_procedural_beta4_gamma0_gs2_tc-inter": "GVAE 4",
             "ada_gvae_shapes3d_procedural_beta1_gamma0_gs2_tc-inter": "Ada-GVAE 1"}


def by_seed(runs, setting):
    """{seed: metrics.json} of a setting's finished runs (compare.load_runs: evaluated at their --steps)."""
    return {m["seed"]: m for m in runs if Path(m["path"]).name.rsplit("_seed", 1)[0] == setting}


def claim_table(runs, lead, baselines, metrics=(("mig", "MIG"), ("group_mig", "group-MIG"))):
    """One row per metric and baseline, over the seeds both have finished: the lead's and the baseline's means,
    their ratio (where the baseline's mean is > 0), each seed's lead minus the baseline's same seed, and whether the
    lead's worst run is above the baseline's best."""
    ours = by_seed(runs, lead)
    lines = ["| metric | against | seeds | group-tcVAE mean | baseline mean | ratio | group-tcVAE minus baseline, "
             "seed by seed | every run ahead of every run |", "|---|---|---|---|---|---|---|---|"]
    for key, name in metrics:
        for setting, label in baselines.items():
            theirs = by_seed(runs, setting)
            seeds = sorted(ours.keys() & theirs.keys())
            if not seeds:
                lines.append(f"| {name} | {label} | none finished by both yet | | | | | |")
                continue
            a, b = (sum(ms[s][key] for s in seeds) / len(seeds) for ms in (ours, theirs))
            worst, best = min(ours[s][key] for s in seeds), max(theirs[s][key] for s in seeds)
            lines.append(f"| {name} | {label} | {', '.join(map(str, seeds))} | {a:.3f} | {b:.3f} | "
                         + (f"{a / b:.2f}" if b > 0 else "-") + " | "
                         + ", ".join(f"{s}: {ours[s][key] - theirs[s][key]:+.3f}" for s in seeds) + " | "
                         + ("yes" if worst > best else f"no ({worst:.3f} <= {best:.3f})") + " |")
    return lines


def factor_lead(runs, lead, baselines, metrics=(("mig", "MIG"), ("group_mig", "group-MIG"))):
    """One row per metric and baseline: the lead's per-factor score (compare.PER_FACTOR) minus the baseline's, mean
    over the seeds both have finished; both scores are the mean of their factors, so the last column, the mean of
    the row, is the difference of the scores."""
    ours = by_seed(runs, lead)
    if not ours:
        return []
    first = next(iter(ours.values()))
    names = [("c: " if n in first["content_factors"] else "\\c: ") + n for n in first["factor_names"]]
    lines = ["| metric | against | seeds | " + " | ".join(names) + " | all factors |", "|---|---|---|" + "---|" * (
        len(names) + 1)]
    for key, name in metrics:
        per_factor = compare.PER_FACTOR[key][0]
        for setting, label in baselines.items():
            theirs = by_seed(runs, setting)
            seeds = sorted(ours.keys() & theirs.keys())
            if seeds:
                diff = sum(per_factor(ours[s]) - per_factor(theirs[s]) for s in seeds) / len(seeds)
                lines.append(f"| {name} | {label} | {', '.join(map(str, seeds))} | "
                             + " | ".join(f"{d:+.3f}" for d in diff) + f" | {diff.mean():+.3f} |")
    return lines


def both_data_sets(runs, dsprites_runs):
    """The README's table: each setting's mean MIG and group-MIG over its finished seeds, on both data sets."""
    lines = ["| model (setting) | dSprites-like: seeds | MIG | group-MIG | 3DShapes-like: seeds | MIG | group-MIG |",
             "|---|---|---|---|---|---|---|"]
    for setting, label in {LEAD: "group-tcVAE 10 / 8 (`inter`)", **BASELINES}.items():
        cells = []
        for ms in (by_seed(dsprites_runs, setting.replace("_shapes3d_procedural", "")), by_seed(runs, setting)):
            seeds = sorted(ms)
            cells += [", ".join(map(str, seeds)) or "none yet"] + [
                f"{sum(ms[s][k] for s in seeds) / len(seeds):.3f}" if seeds else "-" for k in ("mig", "group_mig")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main(out=HERE):
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):  # its table is below, and it wrote to a folder now gone
        runs = compare.load_runs(HERE / "runs")[0]
        dsprites_runs = compare.load_runs(DSPRITES)[0]
        table = compare.summarize(HERE / "runs", tmp)[3:]  # without its mark and title
        figures = sorted(Path(tmp).glob("*.png"))
        for fig in figures:
            (out / fig.name).write_bytes(fig.read_bytes())
    lines = [f"# Results: the 3DShapes-like study ({len(runs)} of its 12 runs)", "",
             "Written by `python docs/shapes3d_study/results.py` from the committed runs ([plan.md](plan.md)). The "
             "paper's claim on 3D Shapes, per metric, is group-tcVAE's lead over MLVAE and GVAE (\"at least 10%\"); "
             "Ada-GVAE is a comparison of ours. group-tcVAE at beta 10, gamma 8, TC `inter` against each baseline "
             "at 10,000 steps, over the seeds both have finished:", ""] + claim_table(runs, LEAD, BASELINES) + [
             "", "Where the differences come from: group-tcVAE's score per factor minus the baseline's (the per-factor "
             "rows of the tables below), mean over the seeds both have finished. c: a content factor, \\c: the "
             "others.", ""] + factor_lead(runs, LEAD, BASELINES) + [
             "", "Both data sets side by side: each setting's mean over its finished seeds, the dSprites-like "
             "runs of [the 30,000-step study](../cpu_study_30k/README.md) (30,000 steps) and the 3DShapes-like "
             "runs here (10,000 steps):", ""] + both_data_sets(runs, dsprites_runs) + [
             "", "What `python compare.py summarize docs/shapes3d_study/runs` writes:", ""] + table
    (out / "results.md").write_text("\n".join(lines).rstrip("\n") + "\n")
    print(f"wrote {out / 'results.md'} and {len(figures)} figures ({len(runs)} runs)")


if __name__ == "__main__":
    main()
