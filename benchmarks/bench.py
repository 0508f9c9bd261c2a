"""Benchmarks for grouptc.py: prints figures side by side from one run on one machine.

    python benchmarks/bench.py                          # everything, CPU
    python benchmarks/bench.py --only step mig          # some sections
    python benchmarks/bench.py --device cuda            # on a GPU: bf16 autocast, the step as one CUDA graph
    python benchmarks/bench.py --device cuda --eager    # ... each step launched eagerly
    python benchmarks/bench.py --only step render --baseline OLD/grouptc.py   # beside an earlier version

Sections:
  step    training step (32 groups) of each model vs a bare step of the same networks on one fixed batch (no
          sampling, rendering or bookkeeping, launched eagerly); the ratio is the overhead of everything around
          the networks (on CUDA, below 1 when the CUDA graph saves more launch time than sampling costs).
          Blocks of steps alternate between the two so that a noisy machine hits both alike.
  render  images/s of both built-in renderers, at the training batch (64) and at 4,096 (beside --baseline's).
  gather  the cost of gathering a batch from a full-size in-memory uint8 array (file-backed data sets).
  mig     mig() against a reference built on sklearn.metrics.mutual_info_score per (latent, factor) pair, at
          N = 10,000 and N = 737,280 (needs scikit-learn; the program itself does not).
  metrics DCI, SAP and modularity against sklearn's GradientBoostingClassifier() and LinearSVC at
          disentanglement_lib's 10,000 / 5,000 points on dSprites' factor sizes (--dci-factors of them for
          sklearn's DCI, which takes minutes on all five); not in the default set.
  load    load time and peak memory (ru_maxrss of a fresh process) of full-size dSprites (npz) and 3D Shapes
          (h5) files in the official layouts, written first into --data-dir from the built-in renderers.
"""

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grouptc as gt  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, n, device):
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def load_code(path):
    """Another grouptc.py (an earlier commit's, say) as a module of its own, to time it beside this one."""
    spec = importlib.util.spec_from_file_location(f"grouptc_at_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_steps(code, argv, device):
    """The run `argv` asks for, built by `code` (this grouptc or an earlier one) -> (run, its full training step as
    the training loop takes it (a fresh batch, then train_step(); on CUDA replayed as one graph unless --eager), a
    bare step: the same networks' update on one fixed batch, without sampling, rendering or bookkeeping)."""
    if hasattr(code, "Sweep"):  # an earlier version: a Sweep of Runs (before one process trained one run)
        sweep = code.Sweep(code.build_runs(code.expand(code.parse_args(argv))))
        run, full = sweep.runs[0], sweep.train_step
    else:
        args = code.parse_args(argv)
        run, names = code.build_run(args), code.MODELS[args.model].terms

        def full():
            classes, shares = run.sample()
            terms = code.train_step(run.vae, run.D, run.vae_opt, run.d_opt, run.images(classes), shares, **run.hyper)
            return torch.stack([terms[n] for n in names])
        if device.type == "cuda" and not args.eager:
            full = code.CudaGraphStep(full, [run.data_gen, run.model_gen], device)
    a = run.args
    classes, shares = run.sample()
    x = run.data.images(classes.flatten(0, 1)).view(*classes.shape[:2], run.data.channels, 64, 64)
    bare = lambda: code.train_step(run.vae, run.D, run.vae_opt, run.d_opt, x, shares, a.model, a.beta,  # noqa
                                   a.gamma, a.content_dims, a.tc_level, run.model_gen, device.type == "cuda")
    return run, full, bare


def bench_step(device, flags, blocks, block_steps, dataset, baseline=None):
    """Each model's full and bare step, blocks alternating; with a baseline, its full step in the same rotation."""
    results = {}
    codes = {"this": gt} | ({"baseline": baseline} if baseline is not None else {})
    for model in gt.MODELS:
        argv = ["--model", model, "--dataset", dataset, "--out", "unused", "--device", str(device)] + flags
        steps = {}
        for name, code in codes.items():
            _, full, bare = make_steps(code, argv, device)
            steps[name] = full
            if name == "this":
                steps["bare"] = bare
        for _ in range(10):  # warm-up (CUDA graph capture)
            for fn in steps.values():
                fn()
        times = {name: [] for name in steps}
        for _ in range(blocks):
            for name, fn in steps.items():
                times[name].append(timed(fn, block_steps, device))
        ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
        ms_full, ms_bare = ms["this"], ms["bare"]
        results[model] = {"step_ms": ms_full, "bare_ms": ms_bare, "ratio": ms_full / ms_bare,
                          "steps_per_s": 1000 / ms_full, "images_per_s": 64 * 1000 / ms_full,
                          "full_run_minutes_300k": 300_000 * ms_full / 60_000}
        line = (f"step  {model:12s} {ms_full:8.2f} ms/step   bare {ms_bare:8.2f} ms   ratio {ms_full / ms_bare:5.3f}"
                f"   {1000 / ms_full:7.1f} steps/s   {64000 / ms_full:8.0f} images/s"
                f"   300k steps: {300_000 * ms_full / 60_000:6.1f} min")
        if baseline is not None:
            results[model]["baseline_step_ms"] = ms["baseline"]
            line += f"   baseline {ms['baseline']:8.2f} ms (this / baseline {ms_full / ms['baseline']:5.3f})"
        print(line, flush=True)
    return results


def bench_render(device, baseline=None, blocks=7):
    """Each renderer at two batch sizes; with a baseline, its renderer in the same rotation of blocks."""
    results = {}
    for cls in ("DSpritesProcedural", "Shapes3DProcedural"):
        renderers = {"this": getattr(gt, cls)(device)}
        if baseline is not None:
            renderers["baseline"] = getattr(baseline, cls)(device)
        name = renderers["this"].name
        for batch in (64, 4096):
            g = torch.Generator(device=device).manual_seed(0)
            sizes = torch.tensor(renderers["this"].factor_sizes, device=device)
            classes = (torch.rand(batch, len(sizes), generator=g, device=device) * sizes).long()
            n = max(3, 3_000 // batch)
            times = {k: [] for k in renderers}
            for _ in range(blocks):
                for k, data in renderers.items():
                    timed(lambda: data.images(classes), 1, device)  # noqa: B023 (called at once)
                    times[k].append(timed(lambda: data.images(classes), n, device))  # noqa: B023
            rate = {k: batch / statistics.median(t) for k, t in times.items()}
            results[f"{name}_{batch}"] = rate["this"]
            line = f"render {name:20s} batch {batch:5d}: {rate['this']:12,.0f} images/s"
            if baseline is not None:
                results[f"{name}_{batch}_baseline"] = rate["baseline"]
                line += f"   baseline {rate['baseline']:12,.0f} images/s (this / baseline {rate['this'] / rate['baseline']:5.2f})"
            print(line, flush=True)
    return results


def bench_gather(device):
    results = {}
    for name, shape, sizes in (("dsprites", (737_280, 64, 64), gt.DSPRITES_SIZES),
                               ("shapes3d", (480_000, 64, 64, 3), gt.SHAPES3D_SIZES)):
        array = np.ones(shape, np.uint8)  # full size, every page touched
        data = gt.ArrayData(array, [f"f{k}" for k in range(len(sizes))], sizes, ["f0"], name, device)
        del array
        g = torch.Generator(device=device).manual_seed(0)
        classes, _ = gt.sample_groups(sizes, [0], 32, 2, g)
        classes = classes.flatten(0, 1)
        timed(lambda: data.images(classes), 5, device)
        seconds = timed(lambda: data.images(classes), 200, device)
        results[name] = {"batch64_ms": 1000 * seconds, "images_per_s": 64 / seconds}
        print(f"gather {name:9s} full size, batch 64: {1000 * seconds:7.3f} ms  ({64 / seconds:12,.0f} images/s)",
              flush=True)
        del data
    return results


def sklearn_mig(codes, factors):
    """The reference: disentanglement_lib's recipe with sklearn's mutual_info_score per (latent, factor) pair."""
    from sklearn.metrics import mutual_info_score
    binned = np.stack([np.digitize(c, np.histogram(c, 20)[1][:-1]) for c in codes.T])
    mi = np.array([[mutual_info_score(f, b) for f in factors.T] for b in binned])
    H = np.array([mutual_info_score(f, f) for f in factors.T])
    top = np.sort(mi, axis=0)[::-1]
    return float(np.mean((top[0] - top[1])[H > 0] / H[H > 0]))


def bench_mig():
    results = {}
    rng = np.random.default_rng(0)
    gt.mig(rng.standard_normal((100, 3)), rng.integers(0, 3, (100, 2)))  # load the compiled kernel
    for n in (10_000, 737_280):
        factors = np.stack([rng.integers(0, s, n) for s in gt.DSPRITES_SIZES], 1)
        codes = factors[:, [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]] + rng.standard_normal((n, 10))
        ours = [timed(lambda: gt.mig(codes, factors), 1, torch.device("cpu")) for _ in range(5)]
        t0 = time.perf_counter()
        reference = sklearn_mig(codes, factors)
        t_ref = time.perf_counter() - t0
        t_ours = statistics.median(ours)
        agree = abs(reference - gt.mig(codes, factors))
        results[n] = {"grouptc_s": t_ours, "sklearn_s": t_ref, "speedup": t_ref / t_ours, "abs_diff": agree}
        print(f"mig   N={n:7,d}: grouptc {t_ours:8.4f} s   sklearn reference {t_ref:8.3f} s   "
              f"{t_ref / t_ours:6.1f}x   |difference| {agree:.1e}", flush=True)
    return results


def bench_metrics(dci_factors):
    """DCI, SAP and modularity against their sklearn-based references (GradientBoostingClassifier(),
    LinearSVC(C=0.01, class_weight="balanced"), as disentanglement_lib calls them) at DL's 10,000 / 5,000 points on
    dSprites' factor sizes, in the same run. sklearn's DCI takes minutes: dci_factors (the first of dSprites' factors,
    shape (3), scale (6), orientation (40), ...) bounds the side-by-side part; ours also runs on every factor.
    The scores are compare.py's (the field's scores moved there from grouptc.py)."""
    import compare as cp
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.svm import LinearSVC
    rng = np.random.default_rng(0)

    def draw(n):
        f = np.stack([rng.integers(0, s, n) for s in gt.DSPRITES_SIZES], 1)
        z = 0.3 * rng.standard_normal((n, 10))
        z[:, :5] += f / np.array(gt.DSPRITES_SIZES)  # a code per factor, the rest noise
        return z, f
    (z, f), (zt, ft) = draw(10_000), draw(5_000)
    cp.dci(z[:200], f[:200, :2], zt[:100], ft[:100, :2])  # compile (or load) the kernels
    cp.sap(z[:200], f[:200], zt[:100], ft[:100])
    cp.modularity(z[:200], f[:200])
    results = {}
    K = dci_factors
    t0 = time.perf_counter()
    ours = cp.dci(z, f[:, :K], zt, ft[:, :K])
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    R, acc = np.zeros((10, K)), []
    for k in range(K):
        g = GradientBoostingClassifier().fit(z, f[:, k])
        R[:, k] = g.feature_importances_
        acc.append(np.mean(g.predict(zt) == ft[:, k]))
    t_ref = time.perf_counter() - t0
    d, c = cp.dci_from_importance(R)
    diff = max(abs(ours["dci_disentanglement"] - d), abs(ours["dci_completeness"] - c),
               abs(ours["dci_informativeness"] - np.mean(acc)))
    trees = 100 * sum(s if s > 2 else 1 for s in gt.DSPRITES_SIZES[:K])
    results["dci"] = {"factors": K, "trees": trees, "grouptc_s": t_ours, "sklearn_s": t_ref,
                      "speedup": t_ref / t_ours, "max_abs_diff": diff}
    print(f"dci   {K} factors ({trees:,} trees), 10,000 / 5,000 points: grouptc {t_ours:7.2f} s   sklearn "
          f"{t_ref:7.2f} s   {t_ref / t_ours:5.1f}x   max |difference| of D, C, I {diff:.4f}", flush=True)
    t0 = time.perf_counter()
    cp.dci(z, f, zt, ft)
    t_all = time.perf_counter() - t0
    results["dci_all_factors_s"] = t_all
    print(f"dci   every dSprites factor (11,300 trees): grouptc {t_all:7.2f} s", flush=True)
    t0 = time.perf_counter()
    S = cp.sap_matrix(z, f, zt, ft)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = np.array([[np.mean(LinearSVC(C=0.01, class_weight="balanced").fit(z[:, i:i + 1], f[:, k])
                             .predict(zt[:, i:i + 1]) == ft[:, k]) for k in range(f.shape[1])] for i in range(10)])
    t_ref = time.perf_counter() - t0
    results["sap"] = {"grouptc_s": t_ours, "sklearn_s": t_ref, "speedup": t_ref / t_ours,
                      "max_abs_diff_matrix": float(np.abs(S - ref).max())}
    print(f"sap   10 codes x 5 factors: grouptc {t_ours:7.3f} s   sklearn {t_ref:7.2f} s   {t_ref / t_ours:5.1f}x   "
          f"max |difference| of the score matrix {np.abs(S - ref).max():.4f}", flush=True)
    t0 = time.perf_counter()
    cp.modularity(z, f)
    results["modularity_s"] = time.perf_counter() - t0
    print(f"modularity: grouptc {results['modularity_s']:.4f} s (the MI matrix MIG uses)", flush=True)
    return results


def write_full_size_files(data_dir, device):
    data_dir.mkdir(parents=True, exist_ok=True)
    npz = data_dir / gt.DSPRITES_NPZ
    if not npz.exists():
        print(f"writing full-size {npz} from the dSprites-like renderer", flush=True)
        sizes = (1,) + gt.DSPRITES_SIZES
        n = int(np.prod(sizes))
        classes = np.stack(np.unravel_index(np.arange(n), sizes), 1).astype(np.int64)
        imgs = np.empty((n, 64, 64), np.uint8)
        render = gt.DSpritesProcedural(device)
        for i in range(0, n, 8192):
            batch = torch.from_numpy(classes[i:i + 8192, 1:])
            imgs[i:i + 8192] = render.images(batch)[:, 0].to(torch.uint8).cpu().numpy()
        np.savez_compressed(npz.with_suffix(".tmp.npz"), imgs=imgs, latents_classes=classes,
                            latents_values=classes.astype(np.float64))
        npz.with_suffix(".tmp.npz").rename(npz)
        del imgs
    h5 = data_dir / "3dshapes.h5"
    if not h5.exists():
        import h5py
        print(f"writing full-size {h5} from the 3DShapes-like renderer", flush=True)
        n = int(np.prod(gt.SHAPES3D_SIZES))
        render = gt.Shapes3DProcedural(device)
        values = [np.linspace(0, 0.9, 10)] * 3 + [np.linspace(0.75, 1.25, 8), np.arange(4.0),
                                                  np.linspace(-30, 30, 15)]
        with h5py.File(h5.with_suffix(".tmp"), "w") as f:
            images = f.create_dataset("images", (n, 64, 64, 3), np.uint8, chunks=(1000, 64, 64, 3),
                                      compression="gzip", compression_opts=4)
            classes = gt.index_to_classes(torch.arange(n), gt.SHAPES3D_SIZES)
            f.create_dataset("labels", data=np.stack([values[k][classes[:, k].numpy()] for k in range(6)], 1))
            for i in range(0, n, 4000):
                x = render.images(classes[i:i + 4000]).permute(0, 2, 3, 1).mul(255).round().to(torch.uint8)
                images[i:i + 4000] = x.cpu().numpy()
        h5.with_suffix(".tmp").rename(h5)


def bench_load(data_dir, device):
    t0 = time.perf_counter()
    write_full_size_files(data_dir, device)
    print(f"(files ready in {time.perf_counter() - t0:.0f} s)", flush=True)
    results = {}
    for name in ("dsprites", "shapes3d"):
        code = (f"import time, resource, sys; sys.path.insert(0, {str(Path(gt.__file__).parent)!r}); "
                f"import grouptc as gt; t = time.perf_counter(); d = gt.load_dataset({name!r}, {str(data_dir)!r}); "
                f"x = d.images(gt.sample_groups(d.factor_sizes, [0], 32, 2)[0].flatten(0, 1)); "
                f"print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "
                f"d.array.nbytes / 2**30)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        seconds, peak_gib, array_gib = map(float, out.split())
        results[name] = {"load_s": seconds, "peak_rss_gib": peak_gib, "array_gib": array_gib}
        print(f"load  {name:9s}: {seconds:6.1f} s, peak RSS {peak_gib:5.2f} GiB for a {array_gib:4.2f} GiB uint8 "
              f"array", flush=True)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", default=["step", "render", "gather", "mig", "load"],
                   choices=["step", "render", "gather", "mig", "load", "metrics"])
    p.add_argument("--dci-factors", type=int, default=2, choices=range(2, 6),
                   help="metrics section: dSprites factors timed against sklearn's DCI (all 5: minutes; DCI's "
                        "entropies need 2 at least)")
    p.add_argument("--baseline", default=None, metavar="GROUPTC_PY",
                   help="another grouptc.py (an earlier commit's): the step and render sections time it in the "
                        "same rotation of blocks, for figures side by side")
    p.add_argument("--device", default="cpu")
    p.add_argument("--eager", action="store_true", help="on CUDA, no CUDA graph for the step section")
    p.add_argument("--dataset", default="dsprites_procedural", help="data set of the step section")
    p.add_argument("--blocks", type=int, default=7, help="alternating timed blocks per model (step section)")
    p.add_argument("--block-steps", type=int, default=10, help="steps per timed block (step section)")
    p.add_argument("--data-dir", default="benchmarks/data", help="where the load section writes its files")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"grouptc benchmarks on {name}; torch {torch.__version__}" +
          (", bf16 autocast" if device.type == "cuda" else "") +
          (", CUDA graph" if device.type == "cuda" and not args.eager else ""), flush=True)
    results = {"device": name, "torch": torch.__version__, "eager": args.eager}
    baseline = load_code(args.baseline) if args.baseline else None
    if "step" in args.only:
        flags = ["--eager"] * args.eager
        results["step"] = bench_step(device, flags, args.blocks, args.block_steps, args.dataset, baseline)
    if "render" in args.only:
        results["render"] = bench_render(device, baseline)
    if "gather" in args.only:
        results["gather"] = bench_gather(device)
    if "mig" in args.only:
        results["mig"] = bench_mig()
    if "metrics" in args.only:
        results["metrics"] = bench_metrics(args.dci_factors)
    if "load" in args.only:
        results["load"] = bench_load(Path(args.data_dir), device)  # loading itself runs on the CPU
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
