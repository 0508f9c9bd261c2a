"""Writes docs/cpu_study_30k/results.md and its figures from the committed runs, nothing typed in by hand.

    python docs/cpu_study_30k/results.py        # from the repository's folder

`python compare.py summarize` over the 15 runs of 30,000 steps and the 3,000-step study's runs of the same five
settings (docs/cpu_study/runs) gives the tables per setting at both lengths; below them come each run's scores at
step 3,000 (its own scores.csv) and every metric at step 30,000. The figures (Figure 4, scores over training) show the
30,000-step runs.
"""
import contextlib
import csv
import importlib.util
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
import compare  # noqa: E402
_spec = importlib.util.spec_from_file_location("shapes3d_results", HERE.parent / "shapes3d_study" / "results.py")
claim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(claim)  # its claim_table(), the paper's claim over the seeds both settings have
SHORT = HERE.parent / "cpu_study" / "runs"
# Runs whose first 3,000 steps were not (all) trained on the AVX2 processor of the 3,000-step study (plan.md): at
# step 3,000 they are other draws of their seeds than that study's runs.
OTHER_DRAW = {"group_tcvae_beta10_gamma8_gs2_tc-full_seed0",  # on an Intel Xeon from step 1,479
              "group_tcvae_beta10_gamma8_gs2_tc-full_seed1",  # from step 1,405
              "gvae_beta4_gamma0_gs2_tc-inter_seed1", "mlvae_beta1_gamma0_gs2_tc-inter_seed2"}  # from step 0
LABELS = {"group_tcvae_beta10_gamma8_gs2_tc-inter": "group-tcVAE (10/8, `inter`)",
          "group_tcvae_beta10_gamma8_gs2_tc-full": "group-tcVAE (10/8, `full`)",
          "mlvae_beta1_gamma0_gs2_tc-inter": "MLVAE 1",
          "gvae_beta4_gamma0_gs2_tc-inter": "GVAE 4",
          "ada_gvae_beta1_gamma0_gs2_tc-inter": "Ada-GVAE 1"}
METRICS = [("factor_vae_score", "FactorVAE"), ("dci_disentanglement", "DCI dis."), ("dci_completeness", "DCI comp."),
           ("dci_informativeness", "DCI inf."), ("sap", "SAP"), ("modularity", "modularity")]


def scores_at(run, step):
    with open(run / "scores.csv", newline="") as f:
        for row in csv.DictReader(f):  # by the columns' names, as grouptc.py writes them
            if int(row["step"]) == step:
                return float(row["mig"]), float(row["group_mig"])
    raise SystemExit(f"{run}/scores.csv has no row at step {step}")


def compact_table(runs):
    """The means of each setting's seeds at 3,000 steps (the 3,000-step study's runs) and at 30,000, every metric,
    then each seed's MIG and group-MIG: the README's table."""
    metrics = [("mig", "MIG"), ("group_mig", "group-MIG")] + METRICS
    lines = ["| setting | steps | seeds | " + " | ".join(t for _, t in metrics) + " | MIG per seed | group-MIG per seed |",
             "|---|---|---|" + "---|" * (len(metrics) + 2)]
    for setting, label in LABELS.items():
        for steps, folder in ((3000, SHORT), (30000, HERE / "runs")):
            ms = [json.loads((folder / r.name / "metrics.json").read_text()) for r in runs
                  if r.name.rsplit("_seed", 1)[0] == setting and (folder / r.name).is_dir()]  # 3,000: seeds 0-2
            if not ms:
                continue
            assert all(m["steps"] == steps for m in ms), (setting, steps)
            per_seed = [", ".join(f"{m[k]:.3f}" for m in ms) for k in ("mig", "group_mig")]
            lines.append(f"| {label} | {steps:,} | {len(ms)} | "
                         + " | ".join(f"{sum(m[k] for m in ms) / len(ms):.3f}" for k, _ in metrics)
                         + f" | {per_seed[0]} | {per_seed[1]} |")
    return lines


def main(out=HERE):
    out = Path(out)
    order = lambda p: (list(LABELS).index(p.name.rsplit("_seed", 1)[0]), p.name)  # noqa: E731 (as LABELS lists)
    runs = sorted((p for p in (HERE / "runs").iterdir() if (p / "metrics.json").exists()), key=order)
    names = [r.name for r in runs]
    with tempfile.TemporaryDirectory() as tmp:
        for length, folder in (("30k", HERE / "runs"), ("3k", SHORT)):
            for name in (n for n in names if (folder / n).is_dir()):  # seeds 3 and 4 have no 3,000-step run
                src, dst = folder / name, Path(tmp) / length / name
                dst.mkdir(parents=True)
                for f in ("config.json", "metrics.json", "scores.csv"):
                    if (src / f).exists():
                        shutil.copy(src / f, dst / f)
        with contextlib.redirect_stdout(io.StringIO()):  # the table is below; not on the terminal too
            table = compare.summarize(tmp, Path(tmp) / "summary")[3:]  # without its mark and title
        for fig in ("figure4_dsprites_procedural.png", "scores_dsprites_procedural.png"):
            shutil.copy(Path(tmp) / "summary" / fig, out / fig)
    lines = [f"# Results: the 30,000-step CPU study ({len(runs)} runs) beside the same settings' runs of the "
             "3,000-step study", "",
             "Written by `python docs/cpu_study_30k/results.py` from the committed runs. Means of each setting's "
             "seeds (at 3,000 steps the 3,000-step study's runs; at 30,000 this study's), every metric, then each "
             "seed's MIG and group-MIG in seed order:", ""] + compact_table(runs) + [
             "", "The paper's claim at 30,000 steps, per metric: group-tcVAE (10/8, `inter`) ahead of MLVAE and GVAE "
             "(Ada-GVAE: a comparison of ours), over the seeds both have:", ""] + claim.claim_table(
                 compare.load_runs(HERE / "runs")[0], "group_tcvae_beta10_gamma8_gs2_tc-inter",
                 {s: LABELS[s] for s in LABELS if not s.startswith("group_tcvae")}) + [
             "", "What `python compare.py summarize` writes for the runs of both studies:", ""] + table + [
        "", "## Each run of 30,000 steps", "",
        "MIG and group-MIG at step 3,000 are the run's own (its scores.csv); the rest at step 30,000 (metrics.json). "
        "Marked \\*: at step 3,000 another draw of its seed than the 3,000-step study's run (trained in part on an "
        "Intel Xeon; plan.md), whose scores the tables above pool at 3,000 steps. Seeds 3 and 4 have no 3,000-step "
        "study run: their scores at step 3,000 are in this table only.", "",
        "| setting | seed | MIG 3,000 | group-MIG 3,000 | MIG 30,000 | group-MIG 30,000 | "
        + " | ".join(t for _, t in METRICS) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(METRICS)]
    for run in runs:
        m = json.loads((run / "metrics.json").read_text())
        setting, seed = run.name.rsplit("_seed", 1)
        mig3, gmig3 = scores_at(run, 3000)
        mark = " \\*" if run.name in OTHER_DRAW else ""
        lines.append(f"| {LABELS[setting]} | {seed}{mark} | {mig3:.3f} | {gmig3:.3f} | {m['mig']:.3f} | "
                     f"{m['group_mig']:.3f} | " + " | ".join(f"{m[k]:.3f}" for k, _ in METRICS) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'results.md'} and 2 figures ({len(runs)} runs)")


if __name__ == "__main__":
    main()
