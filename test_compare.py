"""Tests for compare.py: the field's scores against sklearn and disentanglement_lib's anchors, `score` against the
library on a run's own points, `summarize` on run folders written here (and the committed studies).
Run: python -m pytest -q test_compare.py"""

import collections
import errno
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import compare as cp
import grouptc as gt

HERE = Path(__file__).resolve().parent
NAMES = ["shape", "scale", "orientation", "posX", "posY"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run of 6 steps trained by grouptc.py (gvae on the built-in dSprites renderer, 300 evaluation points)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    with pytest.MonkeyPatch.context() as mp:
        if hasattr(gt, "save_figure"):  # its own figures are not what is tested here
            mp.setattr(gt, "save_figure", lambda fig, path, dpi: (gt.write_atomic(
                path, lambda tmp: fig.savefig(tmp, dpi=10, format="png")), gt._plt().close(fig)))
        assert gt.main(["--model", "gvae", "--dataset", "dsprites_procedural", "--steps", "6", "--batch-size", "4",
                        "--log-every", "3", "--checkpoint-every", "3", "--eval-samples", "300", "--seed", "0",
                        "--device", "cpu", "--out", str(out)]) == 0
    return out


def copy_run(run, folder):
    shutil.copytree(run, folder, ignore=shutil.ignore_patterns("*.png", ".lock"))
    return folder


def metrics_json(folder, **kw):
    """A run folder holding a metrics.json of grouptc's structure (no training): gvae, beta 1, 10 steps, seed 0."""
    rng = np.random.default_rng(zlib.crc32(os.fsencode(folder.name)))
    m = {"mig": 0.1, "group_mig": 0.2, "mi_matrix": rng.uniform(0, 1, (10, 5)).tolist(),
         "factor_entropy": [1.0, 1.7, 3.6, 3.4, 3.4], "factor_names": NAMES, "content_factors": NAMES[:3],
         "content_latents": [5, 6, 7, 8, 9], "model": "gvae", "dataset": "dsprites_procedural", "beta": 1.0,
         "gamma": 0.0, "steps": 10, "seed": 0, "group_size": 2, "tc_level": "inter", "batch_size": 32} | kw
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(m))
    return folder


def config_json(folder, **flags):
    """A run folder's config.json alone (a run not evaluated yet)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "model": "gvae", "dataset": "dsprites_procedural", "beta": 1.0, "gamma": 0.0, "seed": 0, "steps": 10,
        "batch_size": 32, "group_size": 2, "tc_level": "inter", "pairs": "groups", "k": "rnd", "latent_dim": 10,
        "content_dims": 5, "content_factors": None} | flags))
    return folder


# ---------------------------------------------------------------- the field's metric suite, against sklearn (#18)
# disentanglement_lib's unit-test anchors, slow obvious versions, and sklearn's GradientBoostingClassifier and
# LinearSVC (the predictors disentanglement_lib calls; sklearn is a test-only dependency).
METRIC_SIZES = (2, 3, 4, 6, 5)  # a binary factor (one tree a stage) and multiclass ones (one tree per class a stage)


def structured(rng, n, L=10):
    """Uniform factors of SIZES and L codes: linear, nonlinear and mixed ones, a duplicated code, pure noise."""
    f = np.stack([rng.integers(0, s, n) for s in METRIC_SIZES], 1)
    z = rng.normal(size=(n, L)) * 0.5
    z[:, 0] += f[:, 0]
    z[:, 1] += 0.8 * f[:, 1]
    z[:, 2] += 0.4 * f[:, 2] + 0.2 * f[:, 1]
    z[:, 3] += np.sin(f[:, 3])
    z[:, 4] += 0.3 * f[:, 3]
    z[:, 5] += 0.5 * f[:, 4]
    z[:, 6] = z[:, 5]  # duplicated: sklearn splits its importance at random between the two copies
    z[:, 7] += 0.3 * f[:, 4] - 0.3 * f[:, 2]
    return z, f


@pytest.fixture(scope="module")
def metric_data():
    rng = np.random.default_rng(0)
    (z, f), (zt, ft) = structured(rng, 1000), structured(rng, 500)
    return z, f, zt, ft


# --- DCI -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("R, d, c", [
    (np.diag(np.ones(5)), 1.0, 1.0),
    (np.zeros((5, 5)), 0.0, 0.0),
    (np.vstack([np.eye(5), np.eye(5)]), 1.0, 1 - math.log(2) / math.log(10)),  # two codes per factor
    (np.hstack([np.eye(5), np.eye(5)]), 1 - math.log(2) / math.log(10), 1.0),  # two factors per code
])
def test_dci_anchors(R, d, c):
    assert cp.dci_from_importance(R) == pytest.approx((d, c), abs=1e-6)


def test_dci_weights_codes_by_importance():
    """A code with no importance does not count in D; one spread over two factors lowers it by its share."""
    R = np.array([[1.0, 0.0], [0.0, 0.0], [0.5, 0.5]])
    d, c = cp.dci_from_importance(R)
    assert d == pytest.approx(1.0 / 2.0 * 1 + 1.0 / 2.0 * 0, abs=1e-6)
    p = np.array([1.0, 0.5]) / 1.5  # factor 0 over codes 0 and 2, factor 1 on code 2 only
    c0 = 1 + (p * np.log(p)).sum() / math.log(3)
    assert c == pytest.approx(0.75 * c0 + 0.25 * 1.0, abs=1e-6)


@pytest.fixture(scope="module")
def dci_pair(metric_data):
    from sklearn.ensemble import GradientBoostingClassifier
    z, f, zt, ft = metric_data
    ours = cp.dci(z, f, zt, ft)
    R, train, test = np.zeros((z.shape[1], f.shape[1])), [], []
    for k in range(f.shape[1]):
        # DL's call has every default; random_state (None there) only breaks ties: fixed here, for repeatability
        g = GradientBoostingClassifier(random_state=0).fit(z, f[:, k])
        R[:, k] = g.feature_importances_
        train.append(np.mean(g.predict(z) == f[:, k]))
        test.append(np.mean(g.predict(zt) == ft[:, k]))
    d, c = cp.dci_from_importance(R)
    ref = {"dci_disentanglement": d, "dci_completeness": c, "dci_informativeness_train": np.mean(train),
           "dci_informativeness": np.mean(test), "dci_importance": R}
    return ours, ref


@pytest.mark.parametrize("key", ["dci_disentanglement", "dci_completeness", "dci_informativeness_train",
                                 "dci_informativeness"])
def test_dci_matches_sklearn(dci_pair, key):
    ours, ref = dci_pair
    assert abs(ours[key] - ref[key]) < 0.01, (key, ours[key], ref[key])


def test_dci_importance_matches_sklearn(dci_pair):
    """Column sums of the duplicated pair (codes 5, 6) agree; each copy's share is sklearn's coin toss."""
    (ours, ref), keep = dci_pair, [0, 1, 2, 3, 4, 7, 8, 9]
    R, S = ours["dci_importance"], ref["dci_importance"]
    assert np.abs(R[keep] - S[keep]).max() < 0.01
    assert np.abs(R[5] + R[6] - S[5] - S[6]).max() < 0.01


@pytest.mark.parametrize("n_classes", [2, 3, 6])
def test_gbt_is_sklearns_split_for_split_without_tied_codes(n_classes):
    """Codes without exact ties between them (no duplicated code): all 100 stages give sklearn's raw scores, to
    rounding (sklearn breaks exact ties between features at random, so tied codes part the two)."""
    from sklearn.ensemble import GradientBoostingClassifier
    rng = np.random.default_rng(10)
    y = rng.integers(0, n_classes, 600)
    z = rng.normal(size=(600, 5))
    z[:, 0] += y
    z[:, 1] += np.sin(y)
    x = z.astype(np.float32)
    ref = GradientBoostingClassifier(random_state=0).fit(z, y).decision_function(z)
    cp._compile_kernels()
    _, raw, _ = cp._gbt(x, cp.sorted_words(x), y.astype(np.int64), n_classes, x[:5], 0, 100, 0.1, 3)
    np.testing.assert_allclose(raw.T.squeeze(), ref, atol=1e-9)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_gbt_first_stages_exact(n_classes):
    """Before rounding-level ties among the gradients' few distinct values set in, the raw scores are sklearn's."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, n_classes, 300)
    z = rng.normal(size=(300, 4))
    z[:, 0] += 1.5 * y
    z[:, 2] -= 0.5 * y
    x = z.astype(np.float32)
    from sklearn.ensemble import GradientBoostingClassifier
    g = GradientBoostingClassifier(n_estimators=3, random_state=0).fit(z, y)
    imp, _, _ = cp.gbt_classifier(z, y, z[:5], n_stages=3)
    _, raw, _ = cp._gbt(x, cp.sorted_words(x), y.astype(np.int64), n_classes, x[:5], 0, 3, 0.1, 3)
    np.testing.assert_allclose(raw.T.squeeze(), g.decision_function(z), atol=1e-12)
    np.testing.assert_allclose(imp, g.feature_importances_, atol=1e-4)


def test_gbt_small_case_matches_sklearn():
    """Importances and predictions as close to sklearn's as sklearn's own runs (random_state 0, 1, 2) are to each
    other: sklearn breaks exact ties between features at random, and the gradients' few distinct values make ties."""
    from sklearn.ensemble import GradientBoostingClassifier
    rng = np.random.default_rng(2)
    for n_classes in (2, 5):
        y = rng.integers(0, n_classes, 400)
        z = rng.normal(size=(400, 4)) + np.c_[y, np.cos(y), 0 * y, 0 * y]
        z[:, 2] = np.round(z[:, 2], 1)  # many tied values
        yt = rng.integers(0, n_classes, 300)
        zt = rng.normal(size=(300, 4)) + np.c_[yt, np.cos(yt), 0 * yt, 0 * yt]
        sk = [GradientBoostingClassifier(random_state=r).fit(z, y) for r in range(3)]
        imp, p, pt = cp.gbt_classifier(z, y, zt)
        ref, ref_p, ref_pt = sk[0].feature_importances_, sk[0].predict(z), sk[0].predict(zt)
        spread = max(np.abs(g.feature_importances_ - ref).max() for g in sk[1:])
        agree = min(min(np.mean(g.predict(z) == ref_p), np.mean(g.predict(zt) == ref_pt)) for g in sk[1:])
        assert np.abs(imp - ref).max() < max(spread, 0.002) + 0.005
        assert min(np.mean(p == ref_p), np.mean(pt == ref_pt)) > agree - 0.03


def test_dci_perfect_codes():
    rng = np.random.default_rng(3)
    f = rng.integers(0, 4, (1000, 3))
    z = f + 0.05 * rng.normal(size=f.shape)
    got = cp.dci(z[:700], f[:700], z[700:], f[700:])
    assert got["dci_disentanglement"] > 0.9 and got["dci_completeness"] > 0.9 and got["dci_informativeness"] > 0.99


def test_dci_single_class_factor():
    rng = np.random.default_rng(4)
    f = np.c_[rng.integers(0, 3, 300), np.zeros(300, np.int64)]
    z = f + 0.1 * rng.normal(size=f.shape)
    got = cp.dci(z, f, z, f)
    assert np.all(got["dci_importance"][:, 1] == 0) and got["dci_informativeness"] > 0.9


# --- SAP -------------------------------------------------------------------------------------------------------
def test_linear_svc_coefficients_match_sklearn():
    """The exact optimum vs liblinear: at tol 1e-12 to 1e-5 (relative); at its default tol 1e-4 to 1e-3. Wrong
    class weights (e.g. C w_c on the negatives too) or an unregularised intercept move them by far more."""
    from sklearn.svm import LinearSVC
    rng = np.random.default_rng(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # liblinear's convergence warnings at tol 1e-12
        for _ in range(12):
            n, C = int(rng.integers(50, 300)), int(rng.integers(2, 6))
            y = rng.integers(0, C, n)
            y[:C] = np.arange(C)
            x = rng.normal(size=n) * rng.uniform(0.2, 3) + y * rng.uniform(-1, 1) + rng.uniform(-2, 2)
            ours = np.r_[cp.linear_svc_1d(x, y, C)]
            for kw, tol in [({"tol": 1e-12, "max_iter": 100_000}, 1e-5), ({}, 1e-3)]:
                s = LinearSVC(C=0.01, class_weight="balanced", **kw).fit(x[:, None], y)
                ref = np.r_[s.coef_.ravel(), s.intercept_]
                assert np.abs(ours - ref).max() <= tol * np.abs(ref).max(), (kw, ours, ref)


def test_sap_matches_sklearn(metric_data):
    z, f, zt, ft = metric_data
    from sklearn.svm import LinearSVC
    S = cp.sap_matrix(z, f, zt, ft)
    R = np.zeros_like(S)
    for i in range(z.shape[1]):
        for k in range(f.shape[1]):
            s = LinearSVC(C=0.01, class_weight="balanced").fit(z[:, i:i + 1], f[:, k])
            R[i, k] = np.mean(s.predict(zt[:, i:i + 1]) == ft[:, k])
    assert np.abs(S - R).max() < 0.01
    got = cp.sap(z, f, zt, ft)
    assert abs(got["sap"] - cp.sap_from_matrix(R)) < 0.01 and np.array_equal(got["sap_matrix"], S)


def test_sap_anchors():
    rng = np.random.default_rng(6)
    f = rng.integers(0, 2, (2000, 3))
    z = f + 0.1 * rng.normal(size=f.shape)  # each binary factor in its own code
    assert cp.sap(z[:1000], f[:1000], z[1000:], f[1000:])["sap"] > 0.45  # ~1 for its code, ~0.5 for the others
    z2 = np.c_[z[:, 0], z[:, 0]]  # one factor, two identical codes: no gap
    assert cp.sap(z2[:1000], f[:1000, :1], z2[1000:], f[1000:, :1])["sap"] == 0.0


# --- modularity ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mi, want", [
    (np.diag(np.ones(5)), 1.0),
    (np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), 2.0 / 3.0),
    (np.hstack([np.eye(5), np.eye(5)]), 1 - 1 / 9),
])
def test_modularity_anchors(mi, want):
    assert cp.modularity_from_matrix(mi) == pytest.approx(want, abs=1e-12)


def slow_mi(codes, factors, n_bins=20):
    """DL's discretiser (numpy.histogram edges, numpy.digitize) and sklearn's plug-in MI, written out."""
    N, L = codes.shape
    mi = np.zeros((L, factors.shape[1]))
    for i in range(L):
        b = np.digitize(codes[:, i], np.histogram(codes[:, i], n_bins)[1][:-1])
        for k in range(factors.shape[1]):
            joint = collections.Counter(zip(b.tolist(), factors[:, k].tolist()))
            pb, pf = collections.Counter(b.tolist()), collections.Counter(factors[:, k].tolist())
            mi[i, k] = sum(c / N * math.log(c * N / (pb[u] * pf[v])) for (u, v), c in joint.items())
    return mi


def slow_modularity(mi):
    out = []
    for row in mi:
        sq = [v * v for v in row]
        top = max(sq)
        out.append(0.0 if top == 0 else 1 - (sum(sq) - top) / (top * (len(sq) - 1)))
    return sum(out) / len(out)


def test_modularity_matches_slow_version():
    rng = np.random.default_rng(7)
    f = np.stack([rng.integers(0, s, 1000) for s in (3, 6, 5)], 1)
    z = rng.normal(size=(1000, 5))
    z[:, 0] += f[:, 0]
    z[:, 1] += f[:, 1] + 0.5 * f[:, 2]
    z[:, 3] = 0.0  # constant code: MI 0, counts 0
    mi = slow_mi(z, f)
    np.testing.assert_allclose(gt.mutual_info_and_entropy(z, f)[0], mi, atol=1e-12)
    assert cp.modularity(z, f)["modularity"] == pytest.approx(slow_modularity(mi), abs=1e-12)
    rand = rng.random((6, 4)) ** 3
    rand[2] = 0
    assert cp.modularity_from_matrix(rand) == pytest.approx(slow_modularity(rand), abs=1e-12)


# --- FactorVAE -------------------------------------------------------------------------------------------------
def slow_majority_vote(train_votes, eval_votes):
    """Each dim's most frequent training factor (ties: the smallest factor; no votes: factor 0), then the share of
    the evaluation votes that name their dim's factor; and the same share on the training votes."""
    by_dim = collections.defaultdict(collections.Counter)
    for k, d in train_votes:
        by_dim[d][k] += 1
    guess = {d: min(c, key=lambda k: (-c[k], k)) for d, c in by_dim.items()}
    score = lambda votes: sum(guess.get(d, 0) == k for k, d in votes) / len(votes)  # noqa: E731
    return score(train_votes), score(eval_votes)


def test_majority_vote_matches_slow_version():
    rng = np.random.default_rng(8)
    for K, D in [(3, 4), (5, 10), (2, 1)]:
        tk, td = rng.integers(0, K, 500), rng.integers(0, D, 500)
        tk[td == 0] = rng.integers(0, 2, (td == 0).sum())  # near-ties in dim 0
        ek, ed = rng.integers(0, K, 300), rng.integers(0, D + 1, 300)  # dim D never gets a training vote
        got = cp.factor_vae_accuracy(tk, td, ek, ed, K, D + 1)
        want = slow_majority_vote(list(zip(tk, td)), list(zip(ek, ed)))
        assert got == pytest.approx(want, abs=1e-15)


def test_factor_vae_votes_match_slow_version():
    rng = np.random.default_rng(9)
    batches = rng.normal(size=(50, 8, 6)) * rng.uniform(0.1, 2, 6)
    gvar = rng.uniform(0.5, 2, 6)
    active = np.array([True, False, True, True, False, True])
    got = cp.factor_vae_votes(batches, gvar, active)
    dims = np.flatnonzero(active)
    want = [int(np.argmin([np.var(b[:, d], ddof=1) / gvar[d] for d in dims])) for b in batches]
    assert got.tolist() == want


def test_factor_vae_anchors():
    """DL's test: 10 factors of 10 values, the identity representation, batches of 5, 3,000 / 2,000 votes,
    2,500 points for the variances -> in [0.9, 1]; constant codes -> in [0, 0.2] (prune 0: NaN ratios vote
    dim 0, as DL; prune 0.05: no active dim, 0)."""
    kw = dict(n_train=3000, n_eval=2000, n_var=2500, batch_size=5)
    ident = cp.factor_vae_score(lambda f: f.astype(float), [10] * 10, 0, prune=0.0, **kw)
    assert 0.9 <= ident["factor_vae_score"] <= 1.0 and 0.9 <= ident["factor_vae_train_accuracy"] <= 1.0
    assert ident["factor_vae_active_dims"] == 10
    calls = []
    zero = lambda f: (calls.append(len(f)), np.zeros((len(f), 10)))[1]  # noqa: E731
    for prune in (0.0, 0.05):
        got = cp.factor_vae_score(zero, [10] * 10, 1, prune=prune, **kw)
        assert 0.0 <= got["factor_vae_score"] <= 0.2
    # one call for the variances, then the votes' distinct points (here all 25,000 of them: the grid has 10 ** 10
    # points), 256 votes' worth (1,280 points) a call
    assert calls[0] == 2500 and calls[1:21] == [1280] * 19 + [25_000 - 19 * 1280]
    assert calls[21:] == [2500]  # prune 0.05: no active dim, no votes


def slow_factor_vae(encode, sizes, seed, n_train, n_eval, n_var, batch_size, prune, votes_per_call=256):
    """The FactorVAE score with every vote's batch encoded on its own (the same draws as factor_vae_score)."""
    rng, K = np.random.default_rng(seed), len(sizes)
    gvar = encode(rng.integers(0, sizes, (n_var, K))).var(0, ddof=1)
    active = np.flatnonzero(np.sqrt(gvar) >= prune)
    votes = []
    for n in (n_train, n_eval):
        for start in range(0, n, votes_per_call):
            m = min(votes_per_call, n - start)
            ks, f = rng.integers(0, K, m), rng.integers(0, sizes, (m, batch_size, K))
            for k, batch in zip(ks, f):
                batch[:, k] = batch[0, k]
                codes = encode(batch)
                votes.append((k, int(np.argmin([codes[:, d].var(ddof=1) / gvar[d] for d in active]))))
    return slow_majority_vote(votes[:n_train], votes[n_train:])


def test_factor_vae_score_encodes_each_point_once_and_scores_as_vote_by_vote():
    """On a grid of 60 points the votes' points recur: each distinct point is encoded once, and the score is the
    one that encoding every vote's batch on its own gives."""
    sizes, W = [3, 4, 5], np.random.default_rng(4).normal(size=(3, 6))
    seen = []
    encode = lambda f: (seen.extend(map(tuple, f)), np.tanh(f @ W))[1]  # noqa: E731
    kw = dict(n_train=700, n_eval=300, n_var=200, batch_size=8, prune=0.05)
    got = cp.factor_vae_score(encode, sizes, 5, **kw)
    assert len(seen) == 200 + 60 and len(set(seen[200:])) == 60  # the variances' points, then each point once
    want_train, want_eval = slow_factor_vae(lambda f: np.tanh(f @ W), sizes, 5, **kw)
    assert (got["factor_vae_train_accuracy"], got["factor_vae_score"]) == pytest.approx((want_train, want_eval),
                                                                                         abs=1e-15)
    assert 0.5 < got["factor_vae_score"] < 1


def test_factor_vae_score_on_a_grid_of_more_points_than_64_bits_count():
    """20 factors of 10 values (10^20 points): before, each point's flat index overflowed int64 and the votes were
    scored on other points than drawn (0.04 here, where vote by vote gives 0.31)."""
    sizes, kw = [10] * 20, dict(n_train=300, n_eval=200, n_var=200, batch_size=8, prune=0.05)
    encode = lambda f: f[:, :6] + 0.01 * f[:, 6:12]  # noqa: E731
    got = cp.factor_vae_score(encode, sizes, 3, **kw)
    want_train, want_eval = slow_factor_vae(encode, sizes, 3, **kw)
    assert (got["factor_vae_train_accuracy"], got["factor_vae_score"]) == pytest.approx((want_train, want_eval),
                                                                                         abs=1e-15)


# --- bad arguments (issue 44: D16, D17, D18) -------------------------------------------------------------------
def _bad_points():
    rng = np.random.default_rng(11)
    z, f = rng.normal(size=(100, 10)), rng.integers(0, 4, (100, 5))
    nan = z.copy()
    nan[3, 2] = np.nan
    return {  # name -> (codes, factors, test codes, test factors), error, message
        "lengths differ (D16)": ((rng.normal(size=(200, 10)), f, z, f), ValueError, "100 rows for 200 codes"),
        "test lengths differ": ((z, f, z[:50], f), ValueError, "100 rows for 50 codes"),
        "fewer test columns (D17)": ((z, f, z[:, :5], f), ValueError, "columns of the training points"),
        "fewer test factors": ((z, f, z, f[:, :3]), ValueError, "columns of the training points"),
        "NaN codes (D18)": ((nan, f, z, f), ValueError, "1 NaN or infinite"),
        "infinite test codes (D18)": ((z, f, np.where(z > 2, np.inf, z), f), ValueError, "NaN or infinite"),
        "non-integer factors": ((z, f + 0.5, z, f), TypeError, "integer classes"),
        "text codes": ((z.astype(str), f, z, f), TypeError, "real numbers"),
        "empty": ((z[:0], f[:0], z, f), ValueError, "non-empty"),
        "one-dimensional codes": ((z[:, 0], f, z, f), ValueError, r"\(N, L\)"),
        "one-dimensional factors": ((z, f[:, 0], z, f), ValueError, r"\(N, K\)"),
        "one code column": ((z[:, :1], f, z[:, :1], f), ValueError, "at least 2 code columns"),
    }


@pytest.mark.parametrize("metric", ["dci", "sap"])
@pytest.mark.parametrize("case", list(_bad_points()))
def test_the_metrics_refuse_bad_points_before_any_kernel_runs(metric, case):
    """Before: a segmentation fault (D16), a number read past the array that changed from call to call (D17), NaN
    codes scored (D18), IndexErrors. Now a ValueError or TypeError that says what is wrong."""
    args, error, message = _bad_points()[case]
    with pytest.raises(error, match=message):
        getattr(cp, metric)(*args)


def test_the_metrics_refuse_bad_arguments():
    rng = np.random.default_rng(12)
    z, f = rng.normal(size=(100, 4)), rng.integers(0, 3, (100, 3))
    with pytest.raises(ValueError, match="NaN or infinite"):
        cp.modularity(np.where(z > 1, np.nan, z), f)
    with pytest.raises(ValueError, match="100 rows for 99 codes"):
        cp.modularity(z[:99], f)
    with pytest.raises(ValueError, match="at least 2 factors"):
        cp.modularity_from_matrix(np.ones((4, 1)))
    with pytest.raises(ValueError, match="at least 2 x 2"):
        cp.dci_from_importance(np.ones((1, 3)))
    with pytest.raises(ValueError, match="every one present"):
        cp.gbt_classifier(z, np.r_[np.zeros(50, int), np.full(50, 2)], z)
    with pytest.raises(ValueError, match="every label 0..2"):
        cp.linear_svc_1d(z[:, 0], np.r_[np.zeros(50, int), np.full(50, 3)], 3)
    with pytest.raises(ValueError, match="float32's range"):
        cp.dci(z * 1e40, f, z, f)
    # before: n_stages 0 scored all-zero importances, a NaN rate or an infinite C NaN coefficients, seeds beyond 32
    # bits (or below 0) the same trees as others, and a `words` argument of another array's sorting crashed Python
    y = f[:, 0]
    for bad in ({"n_stages": 0}, {"max_depth": 0}, {"max_depth": 40}, {"learning_rate": np.nan}, {"seed": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            cp.gbt_classifier(z, y, z, **bad)
    with pytest.raises(TypeError, match="words"):
        cp.gbt_classifier(z, y, z, words=cp.sorted_words(z[:10].astype(np.float32)))
    for seed in (-1, 2 ** 32):
        with pytest.raises(ValueError, match="seed"):
            cp.dci(z, f, z, f, seed=seed)
    with pytest.raises(ValueError, match="C be a positive number"):
        cp.linear_svc_1d(z[:, 0], y, 3, C=np.inf)
    sizes = [3, 4]
    with pytest.raises(ValueError, match="the codes encode\\(\\) returned hold"):
        cp.factor_vae_score(lambda c: np.full((len(c), 3), np.nan), sizes, 0, n_var=10)  # D18
    with pytest.raises(ValueError, match="shape \\(5, 3\\) for 10 points"):
        cp.factor_vae_score(lambda c: np.zeros((5, 3)), sizes, 0, n_var=10)
    with pytest.raises(TypeError, match="must be a function"):
        cp.factor_vae_score(np.zeros((10, 3)), sizes, 0)
    for bad in ({"n_var": 1}, {"batch_size": 1}, {"n_train": 0}, {"prune": -1.0}, {"n_eval": 2.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            cp.factor_vae_score(lambda c: c.astype(float), sizes, 0, **bad)
    with pytest.raises(ValueError, match="factor_sizes"):
        cp.factor_vae_score(lambda c: c.astype(float), [3, 0], 0)


def test_codes_and_factors_of_different_lengths_no_longer_crash_the_interpreter():
    """D16 in a process of its own: before, it died of a segmentation fault (exit 139)."""
    code = ("import numpy as np, compare as cp; r = np.random.default_rng(0)\n"
            "try:\n cp.dci(r.normal(size=(200, 10)), r.integers(0, 4, (100, 5)), r.normal(size=(100, 10)), "
            "r.integers(0, 4, (100, 5)))\nexcept ValueError as e:\n print('refused:', e)")
    done = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "refused: factors has 100 rows for 200 codes" in done.stdout, done.stderr


# ------------------------------------------------------------------------------------------- compare.py score
def test_score_adds_the_library_s_scores_on_the_run_s_own_points(tiny_run, tmp_path, monkeypatch, capsys):
    """The scores grouptc's evaluation gave with --metrics all: the library's on random_points(seed + 7), SAP and DCI
    tested on half as many at seed + 8, the FactorVAE score drawn from seed + 9; metrics.json keeps what it held.
    DCI, the costly one, is checked on the points it was given and its result (the library's own tests hold the
    result); the others are computed again."""
    run = copy_run(tiny_run, tmp_path / "run")
    before = json.loads((run / "metrics.json").read_text())
    monkeypatch.setattr(cp, "FACTOR_VAE", {"n_train": 200, "n_eval": 100, "n_var": 100, "batch_size": 8,
                                           "prune": 0.0})  # prune 0: the 6-step encoder's dims all count
    calls, dci = [], cp.dci
    monkeypatch.setattr(cp, "dci", lambda *args, **kw: calls.append((args, dci(*args, **kw))) or calls[-1][1])
    assert cp.main(["score", str(run)]) == 0
    err = capsys.readouterr().err
    assert "FactorVAE score, encoding: 100.0%" in err and f"{run}: modularity" in err
    after = json.loads((run / "metrics.json").read_text())
    assert {k: after[k] for k in before if k != "metrics"} == {k: v for k, v in before.items() if k != "metrics"}
    assert after["metrics"] == list(dict.fromkeys(before["metrics"] + ["dci", "sap", "modularity", "factor_vae"]))

    checkpoint = gt.load_checkpoint(run / "checkpoint.pt")
    data = gt.load_dataset("dsprites_procedural")
    vae = gt.VAE(data.channels, 10)
    vae.load_state_dict(checkpoint["vae"])
    classes, test = gt.random_points(data, 300, 0 + 7), gt.random_points(data, 150, 0 + 8)
    codes, factors = gt.encode_means(vae, data, classes, progress=False), classes.numpy()
    test_codes, test_factors = gt.encode_means(vae, data, test, progress=False), test.numpy()
    (args, got), = calls
    for a, b in zip(args, (codes, factors, test_codes, test_factors)):
        assert np.array_equal(a, b)
    want = got | cp.sap(codes, factors, test_codes, test_factors) | cp.modularity(codes, factors) \
        | cp.factor_vae_score(lambda c: gt.encode_means(vae, data, torch.as_tensor(c), progress=False),
                              data.factor_sizes, 0 + 9, **cp.FACTOR_VAE)
    assert want["factor_vae_active_dims"] == 10 and len(want) == 11
    for key, value in want.items():
        assert after[key] == (value.tolist() if isinstance(value, np.ndarray) else value), key


def test_score_goes_on_past_the_runs_it_cannot_score(tiny_run, tmp_path, capsys):
    good = copy_run(tiny_run, tmp_path / "good")
    no_checkpoint = metrics_json(tmp_path / "no_checkpoint")
    no_metrics = copy_run(tiny_run, tmp_path / "no_metrics")
    (no_metrics / "metrics.json").unlink()
    other_step = copy_run(tiny_run, tmp_path / "other_step")
    m = json.loads((other_step / "metrics.json").read_text())
    (other_step / "metrics.json").write_text(json.dumps(m | {"steps": 3}))
    fifo = copy_run(tiny_run, tmp_path / "fifo")
    (fifo / "metrics.json").unlink()
    os.mkfifo(fifo / "metrics.json")  # never waited on (D13)
    odd = copy_run(tiny_run, tmp_path / os.fsdecode(b"odd\xff"))  # D14: scored, or refused in one clear line
    runs = [no_checkpoint, tmp_path / "missing", no_metrics, other_step, fifo, odd, good]
    assert cp.main(["score", *map(str, runs), "--metrics", "modularity"]) == 1
    err = capsys.readouterr().err
    for line in ("no_checkpoint: no checkpoint.pt", "missing: no checkpoint.pt", "no_metrics: no metrics.json",
                 "its checkpoint is at step 6, its metrics.json at step 3", "fifo/metrics.json is not a regular file",
                 f"{tmp_path}/odd\\xff", " of 7 runs not scored"):
        assert line in err, line
    assert "Traceback" not in err and "modularity" in json.loads((good / "metrics.json").read_text())
    assert "modularity" not in json.loads((other_step / "metrics.json").read_text())


def test_score_refuses_a_held_run_and_a_checkpoint_of_wrong_settings(tiny_run, tmp_path, capsys):
    """Before: a run held by grouptc.py (evaluating it anew) or by another `score` was scored all the same, and of
    the two metrics.json written one was lost; a checkpoint whose eval_samples is -5 was a RuntimeError traceback."""
    held, bad = copy_run(tiny_run, tmp_path / "held"), copy_run(tiny_run, tmp_path / "bad")
    before = (held / "metrics.json").read_bytes()
    c = torch.load(bad / "checkpoint.pt", weights_only=True)
    torch.save(c | {"args": c["args"] | {"eval_samples": -5}}, bad / "checkpoint.pt")
    m = json.loads((bad / "metrics.json").read_text())
    (bad / "metrics.json").write_text(json.dumps({k: v for k, v in m.items() if k != "eval_samples"}))
    with gt.RunFolderLock(held):
        assert cp.main(["score", str(held), str(bad), "--metrics", "modularity"]) == 1
    err = capsys.readouterr().err
    assert f"{held} is in use by another process" in err and (held / "metrics.json").read_bytes() == before
    assert "eval_samples must be a whole number >= 0, got -5" in err and "Traceback" not in err
    assert cp.main(["score", str(held), "--metrics", "modularity"]) == 0  # let go: scored


def test_score_takes_only_the_metrics_it_knows(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        cp.main(["score", str(tmp_path), "--metrics", "dci,mig"])
    assert done.value.code == 2 and "unknown metric mig" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- compare.py summarize
def test_a_summary_label_names_what_sets_a_run_apart_from_the_main_grid():
    m = {"model": "mlvae", "dataset": "dsprites_procedural", "group_size": 2, "batch_size": 32, "latent_dim": 10,
         "content_dims": 5, "tc_level": "inter", "pairs": "groups", "beta": 1.0, "gamma": 0.0}
    assert cp.run_label(m) == "mlvae"
    assert cp.run_label(m | {"group_size": 3, "batch_size": 4}) == "mlvae (group size 3) (batch 4)"
    assert cp.run_label(m | {"model": "group_tcvae", "tc_level": "full"}) == "group_tcvae (TC full)"
    assert cp.run_label(m | {"model": "ada_gvae", "pairs": "k_factors", "k": 1}) == "ada_gvae (k_factors, k 1)"
    assert cp.run_label(m | {"content_factors": "shape,scale"}) == "mlvae (content shape,scale)"
    assert cp.run_label(m | {"factor_sizes": [3, 6, 40, 32, 32]}) == "mlvae"  # the official grid
    assert cp.run_label(m | {"factor_sizes": [3, 6, 4, 8, 8]}) == "mlvae (factor sizes 3,6,4,8,8)"  # a sub-grid's
    for off in ({"batch_size": 4}, {"latent_dim": 12}, {"content_factors": "shape,scale"}, {"pairs": "k_factors"},
                {"factor_sizes": [3, 6, 4, 8, 8]}, {"group_size": 3}, {"beta": 3.0}, {"beta": 0.0},
                {"model": "new_model"}):  # the per-model table and Figures 4 and 3(b) pool none of these
        assert cp.on_paper_grid(m) and not cp.on_paper_grid(m | off), off
    assert cp.on_paper_grid(m | {"group_size": 5}, any_group_size=True)  # Figure 3(c)'s
    assert not cp.on_paper_grid(m | {"group_size": 5, "batch_size": 4}, any_group_size=True)
    tc = m | {"model": "group_tcvae", "beta": 10.0, "gamma": 8.0}
    assert cp.on_paper_grid(tc) and cp.on_paper_grid(tc | {"beta": 100.0, "gamma": 64.0})
    for off in ({"beta": 0.0}, {"gamma": 0.0}, {"tc_level": "full"}, {"tc_level": "inter_intra"}, {"beta": 1.0}):
        assert not cp.on_paper_grid(tc | off), off


def test_summary_of_an_empty_folder_is_a_clear_error(tmp_path, capsys):
    assert cp.main(["summarize", str(tmp_path)]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def test_summary_skips_metrics_of_the_wrong_structure(tiny_run, tmp_path, capsys):
    out = copy_run(tiny_run, tmp_path / "runs" / "good")
    steps_as_text = json.loads((out / "metrics.json").read_text()) | {"steps": "5"}
    for name, text in (("a", '{"mig": 0.1}'), ("b", "[1, 2]"), ("c", "not json"), ("d", json.dumps(steps_as_text))):
        (tmp_path / "runs" / name).mkdir()
        (tmp_path / "runs" / name / "metrics.json").write_text(text)
    assert cp.main(["summarize", str(tmp_path / "runs")]) == 0
    err = capsys.readouterr().err
    assert err.count("skipping") == 4 and "'5', not a whole number" in err and "Traceback" not in err
    assert "| gvae (batch 4) | 1 | 0 | 6 | 1 |" in (tmp_path / "runs" / "summary" / "results.md").read_text()


@pytest.mark.parametrize("where,field,value,message", [
    ("metrics", "seed", [1, 2], "its seed is [1, 2], not a whole number"),
    ("metrics", "beta", "ten", "its beta is 'ten', not a number"),
    ("metrics", "model", 5, "its model is 5, not a text"),
    ("metrics", "steps", True, "its steps is True, not a whole number"),
    ("config", "beta", "ten", "its beta is 'ten', not a number"),
    ("config", "content_factors", 5, "config.json is not one of grouptc.py"),
    ("metrics", "sap", 0.1, "KeyError: 'sap_matrix'"),  # a score without its matrix: before, a KeyError traceback
    ("metrics", "dci_completeness", 0.1, "do not agree"),  # (with a dci_importance of 2 x 2, below)
    ("metrics", "dataset", "a/b", "is not a plain name"),  # before, its figure could not be written: exit 1
])
def test_a_run_with_a_field_of_the_wrong_type_is_skipped_with_a_line(tmp_path, capsys, where, field, value, message):
    """D3: before, one such run stopped the whole summary with a traceback and no results.md."""
    metrics_json(tmp_path / "runs" / "good")
    bad = metrics_json(tmp_path / "runs" / "bad", seed=1)
    if where == "metrics":
        (bad / "metrics.json").write_text(json.dumps(json.loads((bad / "metrics.json").read_text()) | {field: value}
                                                     | {"dci_importance": [[0.5, 0.5], [0.5, 0.5]]}))
    else:
        config_json(bad, seed=1, **{field: value})
    assert cp.main(["summarize", str(tmp_path / "runs")]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"skipping {tmp_path / 'runs' / 'bad'}" in err and message in err
    assert "# Results: 1 runs" in (tmp_path / "runs" / "summary" / "results.md").read_text()


def test_the_summary_never_writes_over_a_file_it_did_not_write(tmp_path, capsys):
    metrics_json(tmp_path / "runs" / "a")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "results.md").write_text("# my own notes\n")
    assert cp.main(["summarize", str(tmp_path / "runs"), "--out", str(theirs)]) == 2
    assert "was not written by compare.py summarize" in capsys.readouterr().err
    assert (theirs / "results.md").read_text() == "# my own notes\n"
    assert list(theirs.iterdir()) == [theirs / "results.md"]
    (theirs / "results.md").unlink()
    (theirs / "figure4_dsprites_procedural.png").write_bytes(b"a picture of mine")
    assert cp.main(["summarize", str(tmp_path / "runs"), "--out", str(theirs)]) == 2
    assert "holds figure4_dsprites_procedural.png, and no results.md" in capsys.readouterr().err
    assert (theirs / "figure4_dsprites_procedural.png").read_bytes() == b"a picture of mine"
    assert cp.main(["summarize", str(tmp_path / "runs")]) == 0  # default: RUNS_DIR/summary
    ours = tmp_path / "runs" / "summary"
    assert (ours / "results.md").read_text().startswith(cp.MARK + "\n# Results: 1 runs")
    metrics_json(tmp_path / "runs" / "s", dataset="shapes3d_procedural", factor_names=list(gt.DATASET_FACTORS[
        "shapes3d_procedural"]), content_factors=["object_hue", "scale", "shape"], factor_entropy=[2.3] * 6,
        mi_matrix=np.full((10, 6), 0.1).tolist())
    assert cp.main(["summarize", str(tmp_path / "runs")]) == 0  # over its own: fine
    assert (ours / "figure4_shapes3d_procedural.png").exists()
    shutil.rmtree(tmp_path / "runs" / "s")
    assert cp.main(["summarize", str(tmp_path / "runs")]) == 0  # a data set gone: its figures go too
    assert not list(ours.glob("*shapes3d*")) and (ours / "figure4_dsprites_procedural.png").exists()
    assert not (tmp_path / "runs" / "results.md").exists()


def test_write_and_permission_failures_are_one_clear_line(tmp_path, capsys, monkeypatch):
    """D4, D5: a results.md that is a folder, an output folder that refuses writes, an unreadable folder among the
    runs: before, raw tracebacks."""
    runs = tmp_path / "runs"
    metrics_json(runs / "a")
    (runs / "summary" / "results.md").mkdir(parents=True)
    assert cp.main(["summarize", str(runs)]) == 2
    err = capsys.readouterr().err
    assert "results.md was not written by compare.py summarize (not a regular file)" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    shutil.rmtree(runs / "summary")

    def refuse(self, *args, **kwargs):  # what a read-only folder does (root writes anywhere, so it is simulated)
        raise PermissionError(errno.EACCES, "Permission denied", str(self))
    with monkeypatch.context() as mp:
        mp.setattr(Path, "write_text", refuse)
        assert cp.main(["summarize", str(runs)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: could not write or read {runs / 'summary' / 'results.md'}: Permission denied\n"

    metrics_json(runs / "locked" / "b", seed=1)
    scandir = os.scandir

    def unreadable(path="."):
        if Path(path) == runs / "locked":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", unreadable)
    assert cp.main(["summarize", str(runs)]) == 0
    assert f"skipping {runs / 'locked'}: cannot read it (Permission denied)" in capsys.readouterr().err
    assert "# Results: 1 runs" in (runs / "summary" / "results.md").read_text()
    (runs / "notes.txt").write_text("mine")  # --out a file: before, "could not write or read ...: File exists"
    assert cp.main(["summarize", str(runs), "--out", str(runs / "notes.txt")]) == 2
    assert f"--out {runs / 'notes.txt'} is not a folder" in capsys.readouterr().err


@pytest.fixture
def alarm():
    """Fails a test that waits longer than 30 s (rather than hanging the suite)."""
    def fail(*_):
        raise TimeoutError("waited on a FIFO")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_a_fifo_in_place_of_a_runs_files_never_hangs_the_summary(tmp_path, capsys, alarm):
    """D13: before, reading a FIFO waited for a writer forever."""
    metrics_json(tmp_path / "good")
    (tmp_path / "fifo_metrics").mkdir()
    os.mkfifo(tmp_path / "fifo_metrics" / "metrics.json")
    os.mkfifo(metrics_json(tmp_path / "fifo_config", seed=2) / "config.json")
    os.mkfifo(metrics_json(tmp_path / "fifo_scores", seed=3) / "scores.csv")
    assert cp.main(["summarize", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert f"skipping {tmp_path / 'fifo_config'}: its config.json is not one of grouptc.py (ValueError: not a " \
           "regular file)" in err
    assert f"skipping {tmp_path / 'fifo_metrics'}" in err and "scores.csv: not a regular file" in err
    assert "# Results: 2 runs" in (tmp_path / "summary" / "results.md").read_text()


def test_a_path_with_a_non_utf8_byte_is_summarized(tmp_path, capsys):
    """D14: the folder's name is shown with the byte as \\xff, in results.md and on the terminal."""
    runs = tmp_path / os.fsdecode(b"runs\xff")
    metrics_json(runs / "a")
    assert cp.main(["summarize", str(runs)]) == 0
    assert f"# Results: 1 runs under {tmp_path}/runs\\xff" in (runs / "summary" / "results.md").read_text()
    assert "runs\\xff" in capsys.readouterr().out


def test_summary_prints_no_warnings(tmp_path, recwarn, real_figures):
    """Every figure drawn as it is written: no matplotlib warning, a title that fits (wrapped to its width)."""
    metrics_json(tmp_path / "only", model="group_tcvae", beta=10.0, gamma=8.0)  # no baseline: no Figure 3(b), 3(c)
    assert cp.main(["summarize", str(tmp_path)]) == 0
    assert sorted(p.name for p in (tmp_path / "summary").iterdir()) == ["figure4_dsprites_procedural.png", "results.md"]
    rng = np.random.default_rng(1)
    for model, beta, gs, seed in [(m, b, g, s) for m in ("gvae", "mlvae") for b in (1.0, 4.0) for g in (2, 3)
                                  for s in range(3)]:
        run = metrics_json(tmp_path / f"{model}_{beta}_{gs}_{seed}", model=model, beta=beta, group_size=gs, seed=seed,
                           mig=float(rng.uniform(0, 0.3)), sap=float(rng.uniform(0, 0.1)),
                           sap_matrix=rng.uniform(0, 1, (10, 5)).tolist())
        (run / "scores.csv").write_text("step,mig,group_mig\n5,0.1,0.2\n10,0.2,0.25\n")
    assert cp.main(["summarize", str(tmp_path)]) == 0
    assert len(list((tmp_path / "summary").glob("*.png"))) == 4
    assert [str(w.message) for w in recwarn] == []


def test_summary_reports_each_factors_gaps(tmp_path):
    """results.md's per-factor tables: MIG gap and group-MIG gap over H(v), per setting, from the MI matrices."""
    H = np.array([1.0, 1.5, 3.0, 3.4, 3.4])
    rng = np.random.default_rng(0)
    mis = []
    for seed in (0, 1):
        mi = rng.uniform(0, 0.5, (10, 5))
        mis.append(mi)
        m = {"mig": 0.1, "group_mig": 0.2, "mi_matrix": mi.tolist(), "factor_entropy": H.tolist(),
             "factor_names": NAMES, "content_factors": NAMES[:3], "content_latents": [5, 6, 7, 8, 9],
             "model": "gvae", "dataset": "dsprites_procedural", "beta": 4.0, "gamma": 0.0, "steps": 10,
             "seed": seed, "group_size": 2, "tc_level": "inter"} | ({"modularity": 0.75} if seed else {})
        (tmp_path / f"r{seed}").mkdir()
        (tmp_path / f"r{seed}" / "metrics.json").write_text(json.dumps(m))
    assert cp.main(["summarize", str(tmp_path)]) == 0
    table = (tmp_path / "summary" / "results.md").read_text()
    mig_gap = lambda mi, k: (sorted(mi[:, k])[-1] - sorted(mi[:, k])[-2]) / H[k]  # noqa: E731

    def group_gap(mi, k):
        own = range(5, 10) if k < 3 else range(5)
        return (max(mi[i, k] for i in own) - max(mi[i, k] for i in range(10) if i not in own)) / H[k]

    for gap, title in ((mig_gap, "MIG: the gap"), (group_gap, "group-MIG: best latent")):
        section = table[table.index(title):]
        row = next(line for line in section.splitlines() if line.startswith("| gvae | 4 | 0 |"))
        expected = [np.mean([gap(mi, k) for mi in mis]) for k in range(5)]
        assert [float(v) for v in row.split("|")[5:10]] == pytest.approx(expected, abs=6e-4)
    assert "| gvae | 4 | 0 | 10 | 2 | 0.100 | 0.200 | 0.750 (1 of 2 runs) |" in table  # per setting: the means
    assert "| gvae | 4 | 0 | 10 | 0, 1 | 0.100, 0.100 | 0.200, 0.200 | -, 0.750 |" in table  # each seed, in order


def test_the_summary_pools_only_comparable_runs_and_counts_each_once(tmp_path, capsys):
    rng = np.random.default_rng(0)

    def metrics(folder, config=None, **kw):
        metrics_json(folder, mig=float(rng.uniform(0, 0.3)), **kw)
        if config is not None:
            config_json(folder, **{k: v for k, v in kw.items() if k in ("beta", "gamma", "seed")} | config)
    metrics(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "copy_of_a")  # the same run in two folders
    metrics(tmp_path / "b", steps=20, sap=0.25, sap_matrix=rng.uniform(0, 1, (10, 5)).tolist())
    metrics(tmp_path / "b2", steps=20, seed=1)  # a row's second run, scored without SAP
    metrics(tmp_path / "c", batch_size=64)
    metrics(tmp_path / "d", content_factors=["shape", "posX"], content_latents=[8, 9])
    metrics(tmp_path / "short", config={"steps": 400}, steps=239)  # evaluated halfway
    config_json(tmp_path / "waiting", steps=10, batch_size=32)
    config_json(tmp_path / "other_data", steps=10, dataset="shapes3d_procedural")  # its data set: none finished
    assert cp.main(["summarize", str(tmp_path)]) == 0
    err, table = capsys.readouterr().err, (tmp_path / "summary" / "results.md").read_text()
    assert "holds the same run as" in err and "leaving out" in err and "239 of its 400" in err
    assert "other_data: not evaluated yet" in err
    assert "## shapes3d_procedural\n\nNo run finished yet. Unfinished: gvae, beta 1, gamma 0, 10 steps: 1 run." in table
    shutil.rmtree(tmp_path / "other_data")
    assert "the figures show the 2 runs of 20 steps, not the 3 shorter ones" in err
    assert "# Results: 5 runs" in table and "(3 more unfinished)" in table
    assert "0.250 (1 of 2 runs)" in table  # a score only some of a row's runs have says so
    for row in ("| gvae | 1 | 10 |", "| gvae | 2 | 20 |",  # per model, the paper's grid: one row per length
                "| gvae (batch 64) | 1 | 0 | 10 | 1 |", "| gvae (z 10, z_c 2) (content shape,posX) | 1 | 0 | 10 | 1 |"):
        assert row in table, row
    per_model = table[:table.index("Per setting")]
    assert "batch 64" not in per_model and "content shape,posX" not in per_model and ": 3 of the 5 runs" in per_model
    assert "Unfinished (not counted above): gvae, beta 1, gamma 0, 10 steps: 1 run; gvae, beta 1, gamma 0, 400 " \
           "steps: 1 run." in table
    assert "| model | beta | gamma | steps | c: shape | \\c: scale |" in table  # the other split's own header
    shapes = tmp_path / "on_shapes3d"  # the same settings and seed on another data set: another run
    metrics(shapes, dataset="shapes3d_procedural", factor_names=list(gt.DATASET_FACTORS["shapes3d_procedural"]),
            mi_matrix=rng.uniform(0, 1, (10, 6)).tolist(), factor_entropy=[2.3] * 6,
            content_factors=list(gt.DEFAULT_CONTENT["shapes3d_procedural"]))
    assert cp.main(["summarize", str(tmp_path)]) == 0
    assert "## shapes3d_procedural" in (tmp_path / "summary" / "results.md").read_text()
    assert cp.main(["summarize", str(shapes)]) == 0  # one run's folder summarises that run
    assert "# Results: 1 runs" in (shapes / "summary" / "results.md").read_text()
    shutil.rmtree(shapes)
    for other in ("a", "copy_of_a", "b", "b2", "c", "d"):
        m = json.loads((tmp_path / other / "metrics.json").read_text())
        (tmp_path / other / "metrics.json").write_text(json.dumps(m | {"model": "group_tcvae", "beta": 10.0,
                                                                       "gamma": 8.0}))
    assert cp.main(["summarize", str(tmp_path)]) == 0  # no baseline's runs: no Figure 3(b) or 3(c) at all
    out = tmp_path / "summary"
    assert not list(out.glob("figure3[bc]_*.png")) and (out / "figure4_dsprites_procedural.png").exists()


def test_the_per_model_table_and_figure_4_pool_only_the_paper_s_grid(tmp_path, capsys):
    """Issue 39: before, one row (and Figure 4) pooled every group-tcVAE run, ablations and other TC levels too."""
    for i, (beta, gamma, tc) in enumerate([(10.0, 8.0, "inter"), (0.0, 8.0, "inter"), (10.0, 0.0, "inter"),
                                           (10.0, 8.0, "full")]):
        for seed in range(3):
            metrics_json(tmp_path / f"r{i}_{seed}", model="group_tcvae", beta=beta, gamma=gamma, tc_level=tc, seed=seed,
                         mig=[0.3, 0.0, 0.0, 0.0][i] + 0.01 * seed)
    assert cp.main(["summarize", str(tmp_path)]) == 0
    table, err = (tmp_path / "summary" / "results.md").read_text(), capsys.readouterr().err
    assert "pooling only the runs of the paper's grid" in table and ": 3 of the 12 runs" in table
    assert "| group_tcvae | 3 | 10 | 0.310 | 0.310 | 0.320 |" in table  # the 3 runs at beta 10, gamma 8, TC inter
    for row in ("| group_tcvae | 0 | 8 | 10 | 3 | 0.010 |", "| group_tcvae | 10 | 0 | 10 | 3 | 0.010 |",
                "| group_tcvae (TC full) | 10 | 8 | 10 | 3 | 0.010 |", "| group_tcvae | 10 | 8 | 10 | 3 | 0.310 |"):
        assert row in table, row
    assert "Figures 4 and 3(b) leave out 9 runs off the paper's grid" in err
    assert not (tmp_path / "summary" / "figure3c_dsprites_procedural.png").exists()  # one group size: no Figure 3(c)


def test_the_summary_shows_a_model_and_a_score_it_does_not_know(tiny_run, tmp_path, capsys):
    out = copy_run(tiny_run, tmp_path / "runs" / "good")
    m = json.loads((out / "metrics.json").read_text())
    (tmp_path / "runs" / "other").mkdir()
    (tmp_path / "runs" / "other" / "metrics.json").write_text(json.dumps(m | {"model": "new_model", "mig": 0.5} |
                                                                          {"new_score": 1.0}))
    del m["group_mig"]
    (tmp_path / "runs" / "partial").mkdir()
    (tmp_path / "runs" / "partial" / "metrics.json").write_text(json.dumps(m | {"seed": 1}))  # another seed's
    assert cp.main(["summarize", str(tmp_path / "runs")]) == 0
    table = (tmp_path / "runs" / "summary" / "results.md").read_text()
    assert "| new_model (batch 4) | 1 | 0 | 6 | 1 | 0.500 |" in table and "| gvae (batch 4) | 1 | 0 | 6 | 2 |" in table


# ------------------------------------------------------------------------------ the committed studies' results
def test_the_committed_results_are_what_compare_writes_from_the_committed_runs(tmp_path, monkeypatch):
    """docs/cpu_study/results.md is what `python compare.py summarize docs/cpu_study --out docs/cpu_study` writes,
    docs/cpu_study_30k/results.md what docs/cpu_study_30k/results.py writes (through compare.py) from the committed
    runs of both studies, and docs/shapes3d_study/results.md what its results.py writes from its runs: every score
    as committed, no figure typed in by hand; the README (or the study's own) shows the 30,000-step study's table of
    means as it is."""
    monkeypatch.chdir(HERE)
    cp.summarize("docs/cpu_study", tmp_path / "3k")
    assert (tmp_path / "3k" / "results.md").read_text() == (HERE / "docs" / "cpu_study" / "results.md").read_text()
    spec = importlib.util.spec_from_file_location("results_30k", HERE / "docs" / "cpu_study_30k" / "results.py")
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    results.main(tmp_path)
    written = (tmp_path / "results.md").read_text()
    assert written == (HERE / "docs" / "cpu_study_30k" / "results.md").read_text()
    assert "(15 runs)" in written.splitlines()[0]
    table = written.split("\n\n")[2].splitlines()  # the title, how it was written, then the means
    assert len(table) == 2 + 10 and table[0].startswith("| setting | steps | seeds | MIG |")
    shown = [p for p in (HERE / "README.md", HERE / "docs" / "cpu_study_30k" / "README.md") if p.exists()]
    assert any("\n".join(table) in p.read_text() for p in shown)  # the README's, or the study's own
    spec = importlib.util.spec_from_file_location("results_3d", HERE / "docs" / "shapes3d_study" / "results.py")
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    (tmp_path / "3d").mkdir()
    results.main(tmp_path / "3d")
    written = (tmp_path / "3d" / "results.md").read_text()
    assert written == (HERE / "docs" / "shapes3d_study" / "results.md").read_text()
