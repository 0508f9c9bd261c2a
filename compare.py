"""compare.py: what compares runs of grouptc.py: the field's other scores, and the summary of a grid of runs.

    python compare.py score RUN [RUN ...] [--metrics dci,sap,modularity,factor_vae]    # default: all four
    python compare.py summarize RUNS_DIR [--out DIR]                                    # default: RUNS_DIR/summary

score: each run's VAE from RUN/checkpoint.pt (on the CPU), scored on disentanglement_lib's (DL's) protocol and point
counts, the scores added to RUN/metrics.json (the rest kept). summarize: results.md (per model over the paper's grid,
per setting, each seed, per factor) and Figures 4, 3(b), 3(c) and the scores over training, into --out; it writes
over nothing but a results.md of its own (first line: MARK) and the figures beside it.

The field's scores (not the paper's, MIG and group-MIG; Locatello et al. 2020 report them all), a library of numpy
and Numba: codes (N, L) encoder means, factors (N, K) integer classes; each returns a dict under metrics.json's keys;
bad arguments raise ValueError / TypeError before any kernel runs. scikit-learn is a test dependency only.
    dci()               DCI (Eastwood & Williams 2018), DL's: sklearn's gradient-boosted trees per factor (here in
                        Numba, split for split, 20x+ faster); fitted on 10,000 points, scored on 5,000 others
    sap()               SAP (Kumar et al. 2018), DL's discrete form: sklearn's LinearSVC on each code, solved exactly;
                        10,000 / 5,000 points
    modularity()        modularity (Ridgeway & Mozer 2018) on MIG's 20-bin MI matrix of the 10,000 points
    factor_vae_score()  the FactorVAE score (Kim & Mnih 2018), DL's: 10,000 + 5,000 majority votes of 64 points each
"""

import argparse
import collections
import concurrent.futures
import contextlib
import csv
import json
import math
import os
import stat
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np

import grouptc as gt

MARK = "<!-- written by compare.py summarize: it rewrites this file and the figures beside it -->"


# === THE FIELD'S SCORES (numpy + Numba) ===============================================================================
def _array(x, name="codes", n=None, ndim=2):
    """Codes (n None): a finite, non-empty real (N, L) array, as float64. Classes: an integer array of n rows, (n, K)
    or, ndim 1, (n,). Else TypeError / ValueError."""
    x, codes = np.asarray(x), n is None
    if x.dtype.kind not in ("biuf" if codes else "iu"):
        raise TypeError(f"{name} must be {'real numbers' if codes else 'integer classes'}, got an array of {x.dtype}")
    if x.ndim != ndim or 0 in x.shape:
        raise ValueError(f"{name} must be a non-empty " + ("(N, L) array" if codes else "(N, K) integer array"
                         if ndim == 2 else "(N,) integer array") + f", got shape {x.shape}")
    if not codes and len(x) != n:
        raise ValueError(f"{name} has {len(x)} rows for {n} codes: one row per code")
    if codes and not np.isfinite(x).all():
        raise ValueError(f"{name} hold {x.size - np.isfinite(x).sum()} NaN or infinite values")
    return np.ascontiguousarray(x, np.float64) if codes else x


def _whole(name, value, low, high=math.inf):
    """value if it is a whole number (not a bool) in low..high, else ValueError."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number " + (f">= {low}" if high == math.inf else f"from {low} to "
                         f"{high:,}") + f", got {value!r}")
    return int(value)


def _check_points(codes, factors, test_codes, test_factors, min_codes, min_factors, what):
    """DCI's or SAP's training and test points, checked (shapes, lengths, columns, finite codes, integer factors)."""
    codes, test_codes = _array(codes), _array(test_codes, "test_codes")
    factors = _array(factors, "factors", len(codes))
    test_factors = _array(test_factors, "test_factors", len(test_codes))
    if test_codes.shape[1] != codes.shape[1] or test_factors.shape[1] != factors.shape[1]:
        raise ValueError(f"test points must have the columns of the training points: codes {codes.shape[1]} and "
                         f"{test_codes.shape[1]}, factors {factors.shape[1]} and {test_factors.shape[1]}")
    if codes.shape[1] < min_codes or factors.shape[1] < min_factors:
        raise ValueError(f"{what} needs at least {min_codes} code columns and {min_factors} factors, got "
                         f"{codes.shape[1]} and {factors.shape[1]}")
    return codes, factors, test_codes, test_factors


def _threads():
    """OMP_NUM_THREADS where it is a whole number > 0, else the cores this process may use."""
    text = os.environ.get("OMP_NUM_THREADS", "")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return int(text) if text.isdigit() and int(text) > 0 else cores


# --- Gradient-boosted trees (sklearn's GradientBoostingClassifier(), in Numba) and DCI --------------------------------
_KERNELS = ["_best_splits", "_partition", "_fit_tree", "_gbt", "_l2svm", "_linear_svc"]  # below


def _compile_kernels():
    """numba.njit the _KERNELS, once (cached on disk), in place of their Python definitions: `import compare` stays
    fast."""
    if _KERNELS:
        import numba
        for name in _KERNELS:
            globals()[name] = numba.njit(cache=True, nogil=True)(globals()[name])
        _KERNELS.clear()


_EPS = np.finfo(np.float64).eps
_TIE = np.float32(1e-7)  # sklearn's FEATURE_THRESHOLD: values closer than this (in float32 arithmetic) are one value


def _best_splits(idx, v, g, b, e, total, inv, top, top_at, top_sl, sl):
    """Per feature j, the best squared-error split of a node whose samples idx[j, 2p] (p in b..e-1) are sorted by
    their values v[j, 2p + 1]: the first maximum of sklearn's proxy sum_l^2 / n_l + sum_r^2 / n_r over the p between
    values more than 1e-7 apart (float32) -> top[j] (-inf: none), top_at[j] = p, top_sl[j] = sum_l; sl: scratch.
    All the features in one sweep: their running sums are independent chains, run in parallel."""
    L = idx.shape[0]
    for j in range(L):
        top[j], top_at[j], top_sl[j], sl[j] = -np.inf, -1, 0.0, g[idx[j, 2 * b]]
    for p in range(b + 1, e):
        il, ir = inv[p - b], inv[e - p]
        for j in range(L):
            s = sl[j]
            proxy = s * s * il + (total - s) * (total - s) * ir
            better = (v[j, 2 * p + 1] > v[j, 2 * p - 1] + _TIE) & (proxy > top[j])  # selects, not branches
            top[j] = proxy if better else top[j]
            top_at[j] = p if better else top_at[j]
            top_sl[j] = s if better else top_sl[j]
            sl[j] = s + g[idx[j, 2 * p]]


def _partition(words, idx, out, left, b, e, r):
    """Stable partition of the packed words[b:e] (sample idx[2p]) into out[b:r] (samples with left[s]) and out[r:e]."""
    l = b
    for p in range(b, e):
        go = left[idx[2 * p]]
        q = r + (l - r) * go  # arithmetic, not a branch: the direction is unpredictable
        out[q] = words[p]
        l += go
        r += 1 - go


def _fit_tree(x, words, g, h, leaf_scale, max_depth, feat, thr, val, imp, node, work, left, inv):
    """One regression tree of depth <= max_depth on the negative gradient g, as sklearn's DecisionTreeRegressor(
    splitter="best", criterion="squared_error") grows it, nodes in heap order (children of n: 2n+1, 2n+2). x (N, L)
    float32; words: sorted_words(x), one sort for every tree. Leaf value leaf_scale * sum(g) / sum(h), h = p (1 - p):
    sklearn's Newton step. Fills feat (-1: leaf), thr, val; adds each split's impurity decrease to imp; node <- each
    sample's leaf. work, left: scratch; inv[n] = 1 / n. A node's samples stay sorted by every feature in one segment
    (stable partitions down the tree): a level costs one sweep and one partition, O(N L)."""
    N, L = x.shape
    n_nodes = feat.shape[0]
    cnt, tot, mean, ss = np.zeros(n_nodes, np.int64), np.zeros(n_nodes), np.zeros(n_nodes), np.zeros(n_nodes)
    begin = np.zeros(n_nodes, np.int64)  # node n's segment: begin[n] .. begin[n] + cnt[n]
    top, top_at, top_sl, sl = np.empty(L), np.empty(L, np.int64), np.empty(L), np.empty(L)
    feat[:] = -1
    node[:] = 0
    cnt[0], tot[0] = N, g.sum()
    mean[0] = tot[0] / N
    for s in range(N):
        ss[0] += (g[s] - mean[0]) ** 2
    for depth in range(max_depth):
        lo, hi = 2 ** depth - 1, 2 ** (depth + 1) - 1  # the node ids of this depth
        src = words if depth == 0 else work[depth % 2]
        src_i, src_v = src.view(np.int32), src.view(np.float32)
        split = False
        for n in range(lo, hi):
            if cnt[n] < 2 or ss[n] / cnt[n] <= _EPS:  # sklearn: min_samples_split 2; impurity <= eps: a leaf
                continue
            b, e = begin[n], begin[n] + cnt[n]
            _best_splits(src_i, src_v, g, b, e, tot[n], inv, top, top_at, top_sl, sl)
            # sklearn visits the features in a random order and keeps the first best: exact ties (duplicated codes)
            # go to a random one of the tied features. Emulated by ranking the features at random.
            rank = np.random.permutation(L)
            j = -1
            for i in range(L):
                if top_at[i] >= 0 and (j < 0 or top[i] > top[j] or (top[i] == top[j] and rank[i] < rank[j])):
                    j = i
            if j < 0:
                continue  # every feature constant in the node
            gain = top[j] - tot[n] * tot[n] / cnt[n]  # = n imp - n_l imp_l - n_r imp_r
            if gain / N + _EPS < 0.0:  # sklearn's min_impurity_decrease = 0 test
                continue
            p = top_at[j]
            lv, rv = np.float64(src_v[j, 2 * p - 1]), np.float64(src_v[j, 2 * p + 1])
            t = lv / 2.0 + rv / 2.0  # sklearn's midpoint of two float32 values, in float64
            feat[n], thr[n] = j, t if t != rv else lv
            imp[j] += gain
            a, c = 2 * n + 1, 2 * n + 2
            begin[a], cnt[a], tot[a] = b, p - b, top_sl[j]
            begin[c], cnt[c], tot[c] = p, e - p, tot[n] - top_sl[j]
            mean[a], mean[c] = tot[a] / cnt[a], tot[c] / cnt[c]
            split = True
        if not split:
            break
        for s in range(N):  # move the samples to the children; the children's sums of squares
            n = node[s]
            if n >= lo and feat[n] >= 0:
                left[s] = x[s, feat[n]] <= thr[n]
                node[s] = 2 * n + 2 - left[s]
                ss[node[s]] += (g[s] - mean[node[s]]) ** 2
        if depth + 1 < max_depth:  # stable partition of each split node's segment, every feature
            dst = work[(depth + 1) % 2]
            for j in range(L):
                for n in range(lo, hi):
                    if feat[n] >= 0:
                        _partition(src[j], src_i[j], dst[j], left, begin[n], begin[n] + cnt[n], begin[2 * n + 2])
    num, den = np.zeros(n_nodes), np.zeros(n_nodes)
    for s in range(N):
        num[node[s]] += g[s]
        den[node[s]] += h[s]
    for n in range(n_nodes):  # sklearn's _safe_divide: 0 when the mean hessian is below 1e-150
        val[n] = leaf_scale * num[n] / den[n] if cnt[n] > 0 and abs(den[n] / cnt[n]) >= 1e-150 else 0.0


def _gbt(x, words, y, n_classes, x_test, seed, n_stages, learning_rate, max_depth):
    """GradientBoostingClassifier(), log-loss, from the log prior odds (2 classes: a tree a stage) or the log priors
    minus their mean (K > 2: a tree per class a stage, on the stage's softmax gradients, leaf values times
    (K - 1) / K). -> (L,) summed impurity decreases; (T, N) train and (T, M) test raw scores, T = 1 or K."""
    np.random.seed(seed)
    N, L = x.shape
    T = 1 if n_classes == 2 else n_classes
    n_nodes = 2 ** (max_depth + 1) - 1
    prior = np.minimum(np.maximum(np.bincount(y, minlength=n_classes) / N, _EPS), 1 - _EPS)  # sklearn clips it
    raw, raw_test = np.empty((T, N)), np.empty((T, x_test.shape[0]))
    for k in range(T):
        raw[k] = math.log(prior[1] / (1 - prior[1])) if T == 1 else math.log(prior[k]) - np.log(prior).mean()
        raw_test[k] = raw[k, 0]
    imp = np.zeros(L)
    feat, thr, val = np.empty(n_nodes, np.int64), np.empty(n_nodes), np.empty(n_nodes)
    node, left = np.empty(N, np.int64), np.empty(N, np.uint8)
    work = np.empty((2, L, N), np.int64)
    g, h, z = np.empty((T, N)), np.empty((T, N)), np.empty(T)
    inv = np.ones(N + 1)
    inv[1:] = 1.0 / np.arange(1, N + 1)  # sklearn divides by n; times 1 / n is faster (can differ in the last bit)
    for stage in range(n_stages):
        for s in range(N):  # negative gradients y_k - p_k at the stage's start; h = p_k (1 - p_k)
            if T == 1:
                p = 1.0 / (1.0 + math.exp(-raw[0, s]))
                g[0, s], h[0, s] = (y[s] == 1) - p, p * (1 - p)
            else:
                m = raw[:, s].max()
                for k in range(T):
                    z[k] = math.exp(raw[k, s] - m)
                total = z.sum()
                for k in range(T):
                    g[k, s], h[k, s] = (y[s] == k) - z[k] / total, z[k] / total * (1 - z[k] / total)
        for k in range(T):
            _fit_tree(x, words, g[k], h[k], (T - 1) / T if T > 1 else 1.0, max_depth, feat, thr, val, imp, node,
                      work, left, inv)
            for s in range(N):
                raw[k, s] += learning_rate * val[node[s]]
            for s in range(x_test.shape[0]):  # the test points down the tree
                n = 0
                while feat[n] >= 0:
                    n = 2 * n + 1 if x_test[s, feat[n]] <= thr[n] else 2 * n + 2
                raw_test[k, s] += learning_rate * val[n]
    return imp, raw, raw_test


def sorted_words(x):
    """x (N, L) float32 -> (L, N) int64: per feature, the samples sorted by it, each word packing the sample's index
    (the int32 view's even slots) and its value (the float32 view's odd slots)."""
    order = np.argsort(x, axis=0, kind="stable").T
    words = np.empty(order.shape, np.int64)
    words.view(np.int32)[:, 0::2] = order
    words.view(np.float32)[:, 1::2] = np.take_along_axis(x.T, order, 1)
    return words


def _float32(codes, name):
    if np.abs(codes).max() > np.finfo(np.float32).max:
        raise ValueError(f"{name} exceed float32's range, which the trees work in (sklearn refuses them too)")
    return np.ascontiguousarray(codes, dtype=np.float32)


def gbt_classifier(codes, labels, test_codes, seed=0, n_stages=100, learning_rate=0.1, max_depth=3):
    """sklearn's GradientBoostingClassifier() (100 stages, depth 3, rate 0.1, log-loss, subsample 1, min_samples_split
    2, min_samples_leaf 1; friedman_mse picks squared error's splits, as sklearn 1.9.1 does) fitted on codes (N, L),
    rounded to float32 as sklearn does, and labels (N,) in 0..C-1 (C >= 2, all present); seed breaks exact ties
    between features only (sklearn: random_state). -> (feature_importances_ (L,): the summed impurity decreases,
    normalised to sum 1, as sklearn's; train predictions (N,); test predictions (M,)), as label indices."""
    codes, test_codes = _array(codes), _array(test_codes, "test_codes")
    labels = _array(labels, "labels", len(codes), 1)
    if test_codes.shape[1] != codes.shape[1] or labels.min() < 0 or labels.max() < 1 \
            or len(np.unique(labels)) != labels.max() + 1:
        raise ValueError("labels must be 0..C-1, every one present, C >= 2; test_codes the columns of codes")
    if not 0 < learning_rate < math.inf:
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}")
    x = _float32(codes, "codes")
    return _boost(x, sorted_words(x), labels, _float32(test_codes, "test_codes"), _whole("seed", seed, 0, 2 ** 32 - 1),
                  _whole("n_stages", n_stages, 1, 10 ** 6), learning_rate, _whole("max_depth", max_depth, 1, 20))


def _boost(x, words, y, x_test, seed, n_stages=100, learning_rate=0.1, max_depth=3):
    """gbt_classifier() on checked float32 codes x, x_test and words = sorted_words(x) (dci sorts once for all)."""
    _compile_kernels()
    imp, raw, raw_test = _gbt(x, words, np.ascontiguousarray(y, dtype=np.int64), int(y.max()) + 1, x_test, seed,
                              n_stages, learning_rate, max_depth)
    predict = lambda r: (r[0] >= 0).astype(np.int64) if len(r) == 1 else r.argmax(0)  # noqa: E731 (sklearn's)
    return (imp / imp.sum() if imp.sum() > 0 else imp), predict(raw), predict(raw_test)


def _entropy(p, base):
    """scipy.stats.entropy(p, base=base) along axis 0 (p normalised first)."""
    p = p / p.sum(0)
    return -(p * np.log(p)).sum(0) / math.log(base)


def dci_from_importance(R):
    """DL's disentanglement and completeness of an (L codes, K factors) importance matrix: 1e-11 added, entropies in
    base K (per code) and base L (per factor), weighted by the code's / factor's share of R (uniform if R = 0)."""
    R = _array(R, "the importance matrix")
    L, K = R.shape
    if L < 2 or K < 2 or R.min() < 0:
        raise ValueError(f"an importance matrix is non-negative and at least 2 x 2 (entropies in base L, K): {R.shape}")
    W = R if R.sum() > 0 else np.ones_like(R)
    per_code = 1 - _entropy(R.T + 1e-11, K)
    per_factor = 1 - _entropy(R + 1e-11, L)
    return float(per_code @ (W.sum(1) / W.sum())), float(per_factor @ (W.sum(0) / W.sum()))


def _classes(train, test):
    """train (N,) and test (M,) values -> the sorted train classes' labels 0..C-1, and the test labels (-1 where
    a value is not a train class)."""
    classes, y = np.unique(train, return_inverse=True)
    i = np.minimum(np.searchsorted(classes, test), len(classes) - 1)
    return len(classes), y.reshape(-1), np.where(classes[i] == test, i, -1)


def dci(codes, factors, test_codes, test_factors, seed=0, threads=None):
    """DL's DCI (Eastwood & Williams 2018 with gradient-boosted trees), fitted on codes (DL: 10,000 points) and scored
    on test_codes (5,000 others): per factor, GradientBoostingClassifier() on (codes, factor), R[:, k] = its
    feature_importances_; disentanglement and completeness of R as dci_from_importance; informativeness: the mean
    over factors of the test accuracy (_train: of the training accuracy). A factor with a single train class (sklearn
    refuses it) gets R[:, k] = 0 and the constant prediction. L >= 2 codes, K >= 2 factors; seed + k breaks factor
    k's ties. Fitted on `threads` threads (default _threads(); the kernels release the GIL): the same result.
    -> {dci_disentanglement, dci_completeness, dci_informativeness, dci_informativeness_train, dci_importance: R}"""
    codes, factors, test_codes, test_factors = _check_points(codes, factors, test_codes, test_factors, 2, 2, "DCI")
    L, K = codes.shape[1], factors.shape[1]
    x, x_test, seed = _float32(codes, "codes"), _float32(test_codes, "test_codes"), _whole("seed", seed, 0, 2 ** 32 - K)
    words = sorted_words(x)  # one sort of the codes serves every factor's trees

    def fit(k):
        C, y, y_test = _classes(factors[:, k], test_factors[:, k])
        r, p, p_test = _boost(x, words, y, x_test, seed + k) if C > 1 else (np.zeros(L), 0 * y, 0 * y_test)
        return r, np.mean(p == y), np.mean(p_test == y_test)
    _compile_kernels()
    order = sorted(range(K), key=lambda k: -len(np.unique(factors[:, k])))  # the costliest first
    with concurrent.futures.ThreadPoolExecutor(max(1, min(K, threads or _threads()))) as pool:
        fits = dict(zip(order, pool.map(fit, order)))
    R, train, test = zip(*(fits[k] for k in range(K)))
    d, c = dci_from_importance(R := np.stack(R, 1))
    return {"dci_disentanglement": d, "dci_completeness": c, "dci_informativeness": float(np.mean(test)),
            "dci_informativeness_train": float(np.mean(train)), "dci_importance": R}


# --- SAP: sklearn's LinearSVC(C=0.01, class_weight="balanced") on each single code, solved exactly --------------------
def _l2svm(x, t, c):
    """argmin over (a, b) of 0.5 (a^2 + b^2) + sum_n c_n max(0, 1 - t_n (a x_n + b))^2, t = +-1: liblinear's
    L2-regularised squared-hinge SVM, the intercept a regularised constant feature. Newton steps with backtracking,
    until a full step keeps the set of margin violators: there the piecewise quadratic is exactly minimised."""
    N = len(x)
    a, b = 0.0, 0.0
    active, prev = np.zeros(N, np.bool_), np.ones(N, np.bool_)
    full = False
    for it in range(100):
        ga, gb, haa, hab, hbb, f0 = a, b, 1.0, 0.0, 1.0, 0.5 * (a * a + b * b)
        same = True
        for n in range(N):
            r = 1.0 - t[n] * (a * x[n] + b)
            active[n] = r > 0
            same &= active[n] == prev[n]
            if r > 0:
                f0 += c[n] * r * r
                w = 2.0 * c[n] * r * t[n]
                ga -= w * x[n]
                gb -= w
                haa += 2.0 * c[n] * x[n] * x[n]
                hab += 2.0 * c[n] * x[n]
                hbb += 2.0 * c[n]
        if (full and same) or (ga == 0.0 and gb == 0.0):
            break
        prev[:] = active
        det = haa * hbb - hab * hab
        da, db = -(hbb * ga - hab * gb) / det, -(haa * gb - hab * ga) / det
        step, slope = 1.0, ga * da + gb * db
        while step > 1e-10:  # Armijo backtracking
            a1, b1 = a + step * da, b + step * db
            f1 = 0.5 * (a1 * a1 + b1 * b1)
            for n in range(N):
                r = 1.0 - t[n] * (a1 * x[n] + b1)
                if r > 0:
                    f1 += c[n] * r * r
            if f1 <= f0 + 1e-4 * step * slope:
                break
            step *= 0.5
        a, b = a + step * da, b + step * db
        full = step == 1.0
    return a, b


def _linear_svc(x, y, n_classes, C):
    """LinearSVC(C, class_weight="balanced") on 1-D x, labels y in 0..n_classes-1 -> (coef (n), intercept (n)),
    n = 1 for two classes. Balanced weights w_c = N / (n_classes N_c). Two classes: one problem, class 1 positive,
    each sample's weight C w_y. More: liblinear's one-vs-rest, the positives (class c) C w_c, the negatives plain C."""
    N = len(x)
    w = N / (n_classes * np.bincount(y, minlength=n_classes))
    T = 1 if n_classes == 2 else n_classes
    coef, intercept = np.empty(T), np.empty(T)
    t, c = np.empty(N), np.empty(N)
    for k in range(T):
        pos = 1 if T == 1 else k
        for n in range(N):
            t[n] = 1.0 if y[n] == pos else -1.0
            c[n] = C * w[y[n]] if (T == 1 or y[n] == pos) else C
        coef[k], intercept[k] = _l2svm(x, t, c)
    return coef, intercept


def linear_svc_1d(x, y, n_classes, C=0.01):
    """(coef_, intercept_) of sklearn's LinearSVC(C=C, class_weight="balanced") on the single feature x (N,),
    labels y (N,) in 0..n_classes-1 (all present, n_classes >= 2), at the exact optimum (liblinear stops at tol)."""
    x = _array(np.reshape(x, (-1, 1)), "x")[:, 0]
    y = _array(y, "y", len(x), 1)
    if n_classes < 2 or y.min() < 0 or y.max() != n_classes - 1 or len(np.unique(y)) != n_classes \
            or not 0 < C < math.inf:
        raise ValueError(f"y must hold every label 0..{n_classes - 1} (n_classes >= 2), C be a positive number")
    _compile_kernels()
    return _linear_svc(x, np.ascontiguousarray(y, np.int64), int(n_classes), float(C))


def sap_matrix(codes, factors, test_codes, test_factors, C=0.01):
    """S[i, k] = test accuracy of LinearSVC(C=0.01, class_weight="balanced") fitted on code i alone to factor k;
    prediction = class 1 when the score > 0 (two classes), else argmax of the class scores. A factor with a single
    train class (sklearn refuses it) is predicted constant."""
    codes, factors, test_codes, test_factors = _check_points(codes, factors, test_codes, test_factors, 1, 1, "SAP")
    L, K = codes.shape[1], factors.shape[1]
    S = np.zeros((L, K))
    for k in range(K):
        n_classes, y, y_test = _classes(factors[:, k], test_factors[:, k])
        for i in range(L):
            a, b = linear_svc_1d(codes[:, i], y, n_classes, C) if n_classes > 1 else (np.zeros(1), np.zeros(1))
            score = test_codes[:, i, None] * a + b
            S[i, k] = np.mean(((score[:, 0] > 0) if len(a) == 1 else score.argmax(1)) == y_test)
    return S


def sap_from_matrix(S):
    """Mean over factors of the gap between the two largest entries of the factor's column of S (L >= 2)."""
    S = _array(S, "the SAP matrix")
    if len(S) < 2:
        raise ValueError(f"SAP is a gap between two codes: it needs at least 2 code columns, got {len(S)}")
    top = np.sort(S, axis=0)
    return float(np.mean(top[-1] - top[-2]))


def sap(codes, factors, test_codes, test_factors):
    """DL's SAP score, discrete form (Kumar et al. 2018), fitted on codes (DL: 10,000 points), scored on test_codes
    (5,000 others); L >= 2 codes. -> {sap: sap_from_matrix(S), sap_matrix: S (L, K), see sap_matrix}"""
    _check_points(codes, factors, test_codes, test_factors, 2, 1, "SAP")
    S = sap_matrix(codes, factors, test_codes, test_factors)
    return {"sap": sap_from_matrix(S), "sap_matrix": S}


# --- Modularity (Ridgeway & Mozer 2018) -------------------------------------------------------------------------------
def modularity_from_matrix(mi):
    """DL's modularity of an (L, K >= 2) MI matrix: per code 1 - (sum_k m^2 - max_k m^2) / (max_k m^2 (K - 1)), 0
    for a code whose MI is all 0; mean over all codes."""
    mi = _array(mi, "the MI matrix")
    if mi.shape[1] < 2 or mi.min() < 0:
        raise ValueError(f"modularity needs a non-negative MI matrix of at least 2 factors, got shape {mi.shape}")
    sq = np.square(mi)
    top = sq.max(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = 1 - (sq.sum(1) - top) / (top * (sq.shape[1] - 1))
    return float(np.mean(np.where(top == 0, 0.0, score)))


def modularity(codes, factors, n_bins=20):
    """DL's modularity (on 10,000 points) of the 20-bin MI matrix MIG uses (grouptc.mutual_info_and_entropy:
    numpy.histogram's equal-width bins per code, plug-in MI in nats). -> {modularity: float}"""
    codes = _array(codes)
    mi = gt.mutual_info_and_entropy(codes, _array(factors, "factors", len(codes)), n_bins)[0]
    return {"modularity": modularity_from_matrix(mi)}


# --- FactorVAE score (Kim & Mnih 2018) --------------------------------------------------------------------------------
def factor_vae_votes(batches, global_var, active):
    """batches (V, B, L): the codes of V votes' B-point batches -> (V,) the index, among the active dims, of the
    dim with the smallest var(ddof=1) / global var (DL's argmin; NaN (0 / 0) counts as smallest, as numpy's)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.argmin(batches.var(axis=1, ddof=1)[:, active] / global_var[active], axis=1)


def factor_vae_accuracy(train_factor, train_dim, eval_factor, eval_dim, n_factors, n_dims):
    """Majority-vote classifier: each dim predicts the factor that won most of its training votes (ties: the lowest
    factor index; a dim without votes: factor 0). -> (train accuracy, eval accuracy): the share of votes whose
    factor is the one their dim predicts."""
    train, ev = (np.bincount(np.asarray(f) * n_dims + d, minlength=n_factors * n_dims).reshape(n_factors, n_dims)
                 for f, d in ((train_factor, train_dim), (eval_factor, eval_dim)))
    predict = train.argmax(0)
    return tuple(float(c[predict, np.arange(n_dims)].sum() / c.sum()) for c in (train, ev))


def _encoded(encode, classes, L=None):
    """encode(classes), checked: finite codes, one row per point (of L dims)."""
    codes = _array(encode(classes), "the codes encode() returned")
    if len(codes) != len(classes) or L not in (None, codes.shape[1]):
        raise ValueError(f"encode() returned codes of shape {codes.shape} for {len(classes)} points of {L} dims")
    return codes


def factor_vae_score(encode, factor_sizes, rng, n_train=10_000, n_eval=5_000, n_var=10_000, batch_size=64,
                     prune=0.05, votes_per_call=256, progress=None):
    """DL's FactorVAE score (its point counts are the defaults). encode: (M, K) int64 factor classes -> (M, L) codes
    (the encoder means), called on the n_var points, then on the votes' distinct points, votes_per_call * batch_size
    at a time; rng: numpy Generator (or seed); progress: None, or called with (points encoded, points to encode).
    Global var (ddof 1) of n_var uniform points; dims with std < prune are dropped (DL's study: 0.05; its function
    default: 0). A vote: factor k uniform; batch_size uniform factor vectors, column k set to the first row's value;
    argmin over active dims of var(ddof 1) / global var. Majority-vote classifier from n_train votes, scored on
    n_eval fresh ones. A point that recurs among the votes is encoded once (DL's counts on dSprites: about 537,000
    distinct of 960,000): the same score while a point's code does not depend on the rest of its batch (on the CPU
    it did not, for the run checked). -> {factor_vae_score: the eval accuracy (0 without an active dim),
    factor_vae_train_accuracy, factor_vae_active_dims}"""
    if not callable(encode):
        raise TypeError(f"encode must be a function of factor classes, got {type(encode).__name__}")
    sizes = np.asarray(factor_sizes)
    if sizes.dtype.kind not in "iu" or sizes.ndim != 1 or len(sizes) == 0 or sizes.min() < 1:
        raise ValueError(f"factor_sizes must be positive whole numbers, one per factor, got {factor_sizes!r}")
    for name, value, low in (("n_train", n_train, 1), ("n_eval", n_eval, 1), ("n_var", n_var, 2),
                             ("batch_size", batch_size, 2), ("votes_per_call", votes_per_call, 1)):
        _whole(name, value, low)
    if not isinstance(prune, (int, float)) or not 0 <= prune < math.inf:
        raise ValueError(f"prune must be a number >= 0, got {prune!r}")
    rng, sizes, K = np.random.default_rng(rng), sizes.astype(np.int64), len(sizes)
    first = _encoded(encode, rng.integers(0, sizes, (n_var, K)))
    global_var = first.var(0, ddof=1)
    active = np.sqrt(global_var) >= prune
    if not active.any():
        return {"factor_vae_score": 0.0, "factor_vae_train_accuracy": 0.0, "factor_vae_active_dims": 0}
    ks, batches = [], []  # every vote's factor and batch, drawn as votes_per_call votes at a time
    for n in (n_train, n_eval):
        for start in range(0, n, votes_per_call):
            m = min(votes_per_call, n - start)
            ks.append(rng.integers(0, K, m))
            f = rng.integers(0, sizes, (m, batch_size, K))
            f[np.arange(m), :, ks[-1]] = f[np.arange(m), 0, ks[-1]][:, None]
            batches.append(f.reshape(-1, K))
    points = np.concatenate(batches)
    order = np.lexsort(points.T[::-1])  # sorted as their flat index would be (the last factor fastest), which may
    points, where = points[order], np.empty(len(order), np.int64)  # not fit in 64 bits
    new = np.r_[True, (points[1:] != points[:-1]).any(1)]
    flat, where[order] = points[new], np.cumsum(new) - 1  # the distinct points; each vote point's row of them
    chunk = votes_per_call * batch_size
    codes = []
    for start in range(0, len(flat), chunk):
        codes.append(_encoded(encode, flat[start:start + chunk], first.shape[1]))
        if progress:
            progress(n_var + start + len(codes[-1]), n_var + len(flat))
    codes, where = np.concatenate(codes), where.reshape(n_train + n_eval, batch_size)
    dims = np.concatenate([factor_vae_votes(codes[where[v:v + votes_per_call]], global_var, active)
                           for v in range(0, len(where), votes_per_call)])  # a few MB of codes at a time
    k = np.concatenate(ks)
    train_acc, eval_acc = factor_vae_accuracy(k[:n_train], dims[:n_train], k[n_train:], dims[n_train:], K,
                                              int(active.sum()))
    return {"factor_vae_score": eval_acc, "factor_vae_train_accuracy": train_acc,
            "factor_vae_active_dims": int(active.sum())}


# === `score`: a run's checkpoint scored on DL's points, into its metrics.json =========================================
METRICS = ("dci", "sap", "modularity", "factor_vae")  # --metrics
FACTOR_VAE = {"n_train": 10_000, "n_eval": 5_000, "n_var": 10_000, "batch_size": 64, "prune": 0.05}  # DL's study


def _shown(text):
    """Text (or a path) as it can always be printed and written: a non-UTF-8 byte of a path as \\xNN (another lone
    surrogate as \\udNNN)."""
    text = os.fsdecode(text) if isinstance(text, (bytes, os.PathLike)) else str(text)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _err(text):
    print(_shown(text), file=sys.stderr)


def _why(error):
    return f"{type(error).__name__}: {getattr(error, 'strerror', None) or error}"


def _read(path):
    """A regular file's bytes. Opened without blocking and checked before it is read: a FIFO or a device in its
    place is refused (ValueError), never waited on."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)


@contextlib.contextmanager
def _held(run):
    """RUN/.lock locked as grouptc.py locks it while it trains or evaluates the run; UserError if a process holds it."""
    with open(os.open(run / ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)) as lock:
        try:
            gt.fcntl and gt.fcntl.flock(lock, gt.fcntl.LOCK_EX | gt.fcntl.LOCK_NB)
        except BlockingIOError:
            raise gt.UserError(f"{_shown(run)} is in use by another process (grouptc.py, or another compare.py "
                               "score); score it when that one is done") from None
        yield


def score_run(run, metrics=METRICS, data_dir=None):
    """Score the run in folder `run` on `metrics` (names of METRICS) as grouptc's evaluation did with --metrics:
    the encoder means of its metrics.json's points (random_points(data, eval_samples, seed + 7)); SAP and DCI fitted
    on them and tested on half as many others (seed + 8); modularity on their MI matrix; the FactorVAE score on
    draws of its own (seed + 9). Adds the scores to run/metrics.json (written whole at once, the folder held),
    keeping the rest. data_dir: the official data files' folder, if not the run's own. -> the scores added."""
    run = Path(run)
    path, checkpoint_path = run / "metrics.json", run / "checkpoint.pt"
    for p, what in ((checkpoint_path, "no checkpoint.pt, so no encoder to score"),
                    (path, "no metrics.json: the run is not evaluated yet (finish it with grouptc.py first)")):
        if not os.path.lexists(p):
            raise gt.UserError(f"{_shown(run)}: {what}")
        if not os.path.isfile(p):
            raise gt.UserError(f"{_shown(p)} is not a regular file")
    with _held(run):
        try:
            saved = json.loads(_read(path))
        except (OSError, ValueError) as error:
            raise gt.UserError(f"could not read {_shown(path)} ({_why(error)})") from None
        if not isinstance(saved, dict) or type(saved.get("steps")) is not int:
            raise gt.UserError(f"{_shown(path)} is not a metrics.json of grouptc.py (no whole number of steps)")
        checkpoint = gt.load_checkpoint(checkpoint_path)
        if checkpoint["step"] != saved["steps"]:
            raise gt.UserError(f"{_shown(run)}: its checkpoint is at step {checkpoint['step']:,}, its metrics.json at "
                               f"step {saved['steps']:,}; evaluate it first (python grouptc.py --eval-only --out RUN)")
        t0, a = time.perf_counter(), checkpoint["args"]
        try:
            data = gt.load_dataset(a["dataset"], data_dir or a["data_dir"], "cpu", a.get("allow_subgrid", False))
            vae = gt.VAE(data.channels, a["latent_dim"])
            vae.load_state_dict(checkpoint["vae"])
            seed, n = _whole("seed", a["seed"], 0), _whole("eval_samples", a["eval_samples"], 0)
        except gt.UserError:
            raise
        except (KeyError, TypeError, RuntimeError, ValueError) as error:
            raise gt.UserError(f"{_shown(checkpoint_path)}: its settings and weights make no VAE ({_why(error)})") \
                from None
        count = saved.get("eval_samples")  # the points metrics.json's scores are on (an --eval-only may change them)
        if type(count) is int and count > 0 and count != (n or data.num_points):
            n = 0 if count == data.num_points else count
        scores = _scores(vae, data, n, seed, metrics, saved.get("mig"), run)
        done = saved["metrics"] if isinstance(saved.get("metrics"), list) else []
        saved |= scores | {"metrics": list(dict.fromkeys(done + [m for m in METRICS if m in metrics])),
                           "score_seconds": round(time.perf_counter() - t0, 3)}
        gt.write_text_atomic(path, json.dumps(saved, indent=1, allow_nan=False) + "\n")
    _err(f"{_shown(run)}: " + "  ".join(f"{SCORES[k]} {v:.4f}" for k, v in scores.items() if k in SCORES)
         + "  -> metrics.json")
    return scores


def _scores(vae, data, n, seed, metrics, mig, run):
    """score_run's scores of the encoder on n points of data (0: all) at seed + 7, as lists and numbers."""
    import torch
    classes = gt.random_points(data, n, seed + 7)
    codes, factors = gt.encode_means(vae, data, classes), classes.cpu().numpy()
    if not np.isfinite(codes).all():
        raise gt.UserError(f"{_shown(run)}: the encoder gives NaN or infinite codes; nothing was scored")
    mi, H = gt.mutual_info_and_entropy(codes, factors)
    if type(mig) is float and abs(gt.gap_score(gt.mig_gaps(mi), H) - mig) > 1e-6:
        _err(f"note: {_shown(run)}: MIG on these points is not its metrics.json's (evaluated on another device?)")
    scores = {"modularity": modularity_from_matrix(mi)} if "modularity" in metrics else {}
    if "sap" in metrics or "dci" in metrics:
        test = gt.random_points(data, max(len(codes) // 2, 1), seed + 8)
        test_codes, test_factors = gt.encode_means(vae, data, test), test.cpu().numpy()
        scores |= sap(codes, factors, test_codes, test_factors) if "sap" in metrics else {}
        scores |= dci(codes, factors, test_codes, test_factors, threads=torch.get_num_threads()) \
            if "dci" in metrics else {}
    if "factor_vae" in metrics:
        encode = lambda c: gt.encode_means(vae, data, torch.as_tensor(c), progress=False)  # noqa: E731
        scores |= factor_vae_score(encode, data.factor_sizes, seed + 9, **FACTOR_VAE, progress=lambda done, total:
                                   gt._progress("FactorVAE score, encoding", done, total))
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in scores.items()}


def _failure(error):
    """The one line a UserError, a bad file (ValueError) or a failed write or read (OSError) is told in."""
    if isinstance(error, OSError):
        return f"error: could not write or read {_shown(error.filename or 'a file')}: {error.strerror or error}"
    return f"error: {_shown(error)}"


def score(runs, metrics=METRICS, data_dir=None):
    """score_run() each run; one that cannot be scored gets a line and the others go on. -> 1 if one failed, else 0"""
    failed = 0
    for run in runs:
        try:
            score_run(run, metrics, data_dir)
        except (OSError, ValueError) as error:
            _err(_failure(error))
            failed += 1
    if failed:
        _err(f"{failed} of {len(runs)} runs not scored (above)")
    return int(failed > 0)


# === `summarize`: results.md, Figures 4, 3(b), 3(c), and the scores over training =====================================
# Driven by grouptc.MODELS and SCORES: a model or a score they do not list is shown plainly, never an error.
SCORES = {"mig": "MIG", "group_mig": "group-MIG", "factor_vae_score": "FactorVAE score",  # metrics.json key -> name
          "dci_disentanglement": "DCI disentanglement", "dci_completeness": "DCI completeness",
          "dci_informativeness": "DCI informativeness", "sap": "SAP", "modularity": "modularity"}
PAPER_SCORES = ("mig", "group_mig")  # the paper's: in full in the tables, and over training (scores.csv)
RANGE = {"group_mig": (-1.0, 1.0)}  # every other score lies in [0, 1]
# The paper's grid, as its Figure 4 pools it: group-tcVAE's beta x gamma at TC inter, the baselines' betas (Locatello
# et al. 2020's; gamma unused), on group pairs; the rest at the defaults below and the data set's official grid.
GRID = {"group_tcvae": ((10, 20, 30, 40, 50, 100), (1, 8, 16, 32, 64))}  # model -> (betas, gammas)
BASELINE_BETAS = (1, 2, 4, 6, 8, 16)
DEFAULTS = {"group_size": 2, "batch_size": 32, "latent_dim": 10, "content_dims": 5}
OFFICIAL_SIZES = {"dsprites": (3, 6, 40, 32, 32), "shapes3d": (10, 10, 10, 8, 4, 15)}  # (also the renderers')
GRID_TEXT = ("group-tcVAE at beta {10, 20, 30, 40, 50, 100} x gamma {1, 8, 16, 32, 64}, TC inter; MLVAE, GVAE, "
             "Ada-GVAE, Ada-ML-VAE at beta {1, 2, 4, 6, 8, 16}; all on group pairs, batch 32, z 10, z_c 5, the "
             "default content factors and the official factor grid")
FIGURES = ("figure4", "figure3b", "figure3c", "scores")  # written as FIGURE_DATASET.png
REQUIRED = {"model", "dataset", "beta", "gamma", "steps"}
TYPES = {"model": str, "dataset": str, "beta": (int, float), "gamma": (int, float), "steps": int, "seed": int,
         "group_size": int, "tc_level": str, "pairs": str, "k": (int, str), "batch_size": int, "latent_dim": int,
         "content_dims": int}
TYPE_NAMES = {str: "a text", int: "a whole number", (int, float): "a number", (int, str): "a whole number or a text"}
PER_FACTOR_FIELDS = (("sap", "sap_matrix"), ("dci_completeness", "dci_importance"))  # a score's (L, K) matrix
BAD_FILE = (OSError, ValueError, KeyError, TypeError)  # what reading a malformed run's file raises


def _number(x):
    """A beta or gamma as the tables show it: %g, or every digit where %g would hide a difference."""
    return f"{x:g}" if float(f"{x:g}") == x else repr(x)


def _color(model):
    """One colour per model in every figure (a model MODELS does not list: one of the colours it leaves free)."""
    free = ("tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
    return gt.MODELS[model].color if model in gt.MODELS else free[zlib.crc32(_shown(model).encode()) % len(free)]


def _order(key):
    """Sort key of a model's name or of a setting (or another tuple that starts with a label): the models in MODELS'
    order (others after them), then by name and the rest."""
    model = key if isinstance(key, str) else key[0].split()[0]
    return list(gt.MODELS).index(model) if model in gt.MODELS else len(gt.MODELS), model, key


def run_label(m):
    """How a run is named in the tables: its model, and each run-defining flag but beta, gamma and the seed where it
    is not the paper's grid's (m: a metrics.json, or a config.json's flags; an early metrics.json without its dims:
    the MI matrix's)."""
    latent, content = (len(m["mi_matrix"]), len(m["content_latents"])) if "latent_dim" not in m and "mi_matrix" in m \
        else (m.get("latent_dim", DEFAULTS["latent_dim"]), m.get("content_dims", DEFAULTS["content_dims"]))
    default, chosen = gt.DEFAULT_CONTENT.get(m["dataset"]), gt.content_names(m)
    official, sizes = OFFICIAL_SIZES.get(m["dataset"].replace("_procedural", "")), tuple(m.get("factor_sizes") or ())
    tc, label = m.get("tc_level", "inter"), m["model"]
    for what, differs in ((f"group size {m.get('group_size')}", m.get("group_size", 2) != 2),
                          (f"TC {tc}", tc != "inter"),
                          (f"{m.get('pairs')}, k {m.get('k', 'rnd')}", m.get("pairs", "groups") != "groups"),
                          (f"batch {m.get('batch_size')}", m.get("batch_size", 32) != DEFAULTS["batch_size"]),
                          (f"z {latent}, z_c {content}",
                           (latent, content) != (DEFAULTS["latent_dim"], DEFAULTS["content_dims"])),
                          (f"content {','.join(chosen)}", default is not None and chosen != default),
                          (f"factor sizes {','.join(map(str, sizes))}", bool(sizes) and sizes != official)):
        label += f" ({what})" if differs else ""
    return label


def setting(m):
    """What one row of the tables pools: every run-defining flag but the seed (label, beta, gamma), and the steps."""
    return run_label(m), m["beta"], m["gamma"], m["steps"]


def on_paper_grid(m, any_group_size=False):
    """Whether a run is one of the paper's grid (GRID_TEXT), as the per-model table and Figures 4 and 3(b) pool
    them (any_group_size: and Figure 3(c), over the group sizes)."""
    model = m["model"]
    if model not in gt.MODELS or run_label(m | {"group_size": 2} if any_group_size else m) != model:
        return False
    if gt.MODELS[model].baseline:
        return m["beta"] in BASELINE_BETAS and m["gamma"] == gt.MODELS[model].gamma
    betas, gammas = GRID.get(model, ((), ()))
    return m["beta"] in betas and m["gamma"] in gammas


def _check_run(m, metrics=True):
    """An error (BAD_FILE) that says what is wrong with a metrics.json (metrics=False: a config.json's flags)."""
    if not isinstance(m, dict):
        raise ValueError(f"it holds a {type(m).__name__}, not an object")
    if metrics:
        mi, K = np.array(m["mi_matrix"], float), len(m["factor_names"])
        if not (mi.ndim == 2 and mi.shape[1] == K == len(m["factor_entropy"])
                and all(type(m[k]) in (int, float) and math.isfinite(m[k]) for k in SCORES if k in m)
                and set(m["content_factors"]) <= set(m["factor_names"])
                and all(type(i) is int and 0 <= i < len(mi) for i in m["content_latents"])
                and (m.get("factor_sizes") is None or len(m["factor_sizes"]) == K
                     and all(type(n) is int and n > 0 for n in m["factor_sizes"]))
                and all(np.array(m[f], float).shape == mi.shape for k, f in PER_FACTOR_FIELDS if k in m)):
            raise ValueError("its MI matrix, factors or scores do not agree")
    for key, kind in TYPES.items():
        v = m.get(key)
        if (v is not None or key in REQUIRED) and (isinstance(v, bool) or not isinstance(v, kind)
                                                   or isinstance(v, float) and not math.isfinite(v)):
            raise ValueError(f"its {key} is {v!r}, not {TYPE_NAMES[kind]}")
    if not all(m[k] and all(c.isalnum() or c in "_.-" for c in m[k]) for k in ("model", "dataset")):  # file names
        raise ValueError(f"its model or dataset ({m['model']!r}, {m['dataset']!r}) is not a plain name")
    setting(m)  # its content factors and dims make a label


def _is_run(folder):
    return any(os.path.lexists(os.path.join(folder, f)) for f in ("config.json", "checkpoint.pt", "metrics.json"))


def runs_below(folder):
    """The run folders below `folder` (at any depth, never inside a run, no symlinks), sorted; a folder that cannot
    be read is left out with a line."""
    try:
        with os.scandir(folder) as entries:
            entries = sorted(entries, key=lambda e: e.name)
    except OSError as error:
        _err(f"skipping {_shown(folder)}: cannot read it ({error.strerror or error})")
        return []
    return [p for e in entries if e.is_dir(follow_symlinks=False)
            for p in ([Path(e.path)] if _is_run(e.path) else runs_below(e.path))]


def load_runs(runs_dir):
    """Every run under runs_dir evaluated at its steps: its metrics.json, if it has the structure and types grouptc
    writes (others are skipped, with a line that says why); one run found in two folders is counted once, and runs
    not evaluated at their --steps are left out, with a line each. -> (runs, unfinished: the flags of those)."""
    runs, unfinished, seen = [], [], {}
    for folder in [Path(runs_dir)] if _is_run(runs_dir) else runs_below(runs_dir):
        path, config, m = folder / "metrics.json", folder / "config.json", None
        try:
            flags = json.loads(_read(config)) if os.path.lexists(config) else None
            flags = flags if isinstance(flags, dict) and REQUIRED <= set(flags) else None  # else no run's config
            if flags:
                _check_run(flags, metrics=False)
        except BAD_FILE as error:
            _err(f"skipping {_shown(folder)}: its config.json is not one of grouptc.py ({_why(error)})")
            continue
        try:
            if os.path.lexists(path):
                _check_run(m := json.loads(_read(path)))
        except BAD_FILE as error:
            _err(f"skipping {_shown(path)}: not a metrics.json of grouptc.py ({_why(error)})")
            continue
        if flags and (m is None or m["steps"] < flags["steps"]):
            _err(f"leaving out {_shown(folder)}: " + ("not evaluated yet (no metrics.json)" if m is None else
                                                     f"evaluated at step {m['steps']:,} of its {flags['steps']:,}"))
            unfinished.append(flags | {"path": folder})
        elif m is not None and (key := (m["dataset"], setting(m), m.get("seed"))) in seen:
            _err(f"{_shown(folder)} holds the same run as {_shown(seen[key])} (same settings, seed and steps): "
                 "counted once")
        elif m is not None:
            seen[key] = m["path"] = folder
            runs.append(m)
    return runs, unfinished


def _over_entropy(m, gaps):
    H = np.array(m["factor_entropy"])
    return gaps / np.where(H > 0, H, np.nan)  # NaN for one-valued factors


PER_FACTOR = {  # score -> (metrics.json -> its value per factor (K,), what the row means)
    "mig": (lambda m: _over_entropy(m, gt.mig_gaps(np.array(m["mi_matrix"]))),
            "MIG: the gap between the two latents that know the factor best, over H(v); MIG is the mean of this row."),
    "group_mig": (lambda m: _over_entropy(m, gt.group_gaps(np.array(m["mi_matrix"]), m["content_latents"],
                                                           [m["factor_names"].index(n) for n in m["content_factors"]])),
                  "group-MIG: best latent of the factor's own group minus the best of the other group, over H(v); "
                  "group-MIG is the mean of this row."),
    "sap": (lambda m: gt.mig_gaps(np.array(m["sap_matrix"])),
            "SAP: the gap between the two latents whose linear SVM predicts the factor best; SAP is the mean of this "
            "row."),
    "dci_completeness": (lambda m: 1 - _entropy(np.array(m["dci_importance"]) + 1e-11, len(m["dci_importance"])),
                         "DCI completeness per factor: 1 - the entropy (base L) of its importance over the latents; "
                         "DCI completeness is their mean weighted by each factor's share of the importance."),
}


def split_group_mig(m):
    """group-MIG over the content factors alone and over the non-content factors alone (Figure 3b)."""
    per_factor = PER_FACTOR["group_mig"][0](m)
    is_content = np.isin(m["factor_names"], m["content_factors"])
    return float(np.nanmean(per_factor[is_content])), float(np.nanmean(per_factor[~is_content]))


def _stat(group, score, reduce):
    """A cell: reduce() of the runs' scores; it says so when only some of the runs have that score."""
    values = [m[score] for m in group if score in m]
    some = f" ({len(values)} of {len(group)} runs)" if 0 < len(values) < len(group) else ""
    return f"{reduce(values):.3f}{some}" if values else "-"


def unfinished_line(unfinished, title):
    """One line of results.md: the unfinished runs (their flags), counted per setting."""
    waiting = collections.Counter(setting(u) for u in unfinished)
    return f"{title}: " + "; ".join(
        f"{label}, beta {_number(beta)}, gamma {_number(gamma)}, {steps:,} steps: {n} run{'s' * (n > 1)}"
        for (label, beta, gamma, steps), n in sorted(waiting.items(), key=lambda kv: _order(kv[0]))) + "."


def _table(header, rows):
    """A markdown table: the header's cells, the rule under them, each row's cells."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(map(str, row)) + " |" for row in rows]


def results_table(rs, dataset, unfinished=()):
    """results.md's section for one data set: per model over the paper's grid; per setting (the runs that agree on
    every run-defining flag but the seed, and on their steps); each seed; the scores per factor."""
    scores, grid = [k for k in SCORES if any(k in m for m in rs)], [m for m in rs if on_paper_grid(m)]
    columns = [(k, s, f) for k in scores for s, f in (("mean", np.mean), ("median", np.median), ("best", np.max))
               if k in PAPER_SCORES or s == "mean"]  # the paper's scores in full, the others' means
    lines = [f"## {dataset}", "", f"Per model, pooling only the runs of the paper's grid ({GRID_TEXT}), as its "
             f"Figure 4 does: {len(grid)} of the {len(rs)} runs. The tables per setting below have every run.", ""]
    models = {key: [m for m in grid if (m["model"], m["steps"]) == key]
              for key in sorted({(m["model"], m["steps"]) for m in grid}, key=_order)}
    lines += _table(["model", "runs", "steps"] + [f"{SCORES[k]} {s}" for k, s, _ in columns], [
        [model, len(group), f"{steps:,}"] + [_stat(group, k, f) for k, _, f in columns]
        for (model, steps), group in models.items()]) if grid else []
    head = ["model", "beta", "gamma", "steps"]
    rows = [([label, _number(beta), _number(gamma), f"{steps:,}"],
             sorted([m for m in rs if setting(m) == key], key=lambda m: m.get("seed", 0)))
            for key in sorted({setting(m) for m in rs}, key=_order) for label, beta, gamma, steps in [key]]
    lines += ["", "Per setting (mean over seeds):", ""] + _table(
        head + ["runs"] + [f"{SCORES[k]} mean" for k in scores],
        [row + [len(group)] + [_stat(group, k, np.mean) for k in scores] for row, group in rows])
    lines += ["", "Each seed (the seeds' scores in the order of the seeds column; - where a run lacks the score):",
              ""] + _table(head + ["seeds"] + [SCORES[k] for k in scores], [
                  row + [", ".join(str(m.get("seed", "-")) for m in group)]
                  + [", ".join(f"{m[k]:.3f}" if k in m else "-" for m in group) for k in scores]
                  for row, group in rows])
    if unfinished:
        lines += ["", unfinished_line(unfinished, "Unfinished (not counted above)")]
    names = rs[0]["factor_names"]
    for key in (k for k in scores if k in PER_FACTOR):
        for split in sorted({gt.content_names(m) for m in rs}):  # one table per content split: its columns' marks
            scored = [(row, [m for m in group if key in m]) for row, group in rows]
            lines += ["", f"Per factor, mean over seeds (c: content factor, \\c: the others). {PER_FACTOR[key][1]}",
                      ""] + _table(head + [("c: " if n in split else "\\c: ") + n for n in names], [
                          row + [f"{g:.3f}" for g in np.nanmean([PER_FACTOR[key][0](m) for m in group], axis=0)]
                          for row, group in scored if group and gt.content_names(group[0]) == split])
    return lines + [""]


_plt = gt._plt  # matplotlib.pyplot on the Agg backend


def _figure(cols, width, height, rows=1):
    """A figure of rows x cols panels, each width x height inches, laid out (titles included) as it is drawn."""
    return _plt().subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, layout="constrained")


def _title(target, text, inches, fontsize=9):
    """A title wrapped to the width it has (9-point text: about 13 characters an inch), so that none is clipped."""
    text = "\n".join(textwrap.fill(line, max(20, int(inches * 118 / fontsize))) for line in text.split("\n"))
    (target.suptitle if hasattr(target, "suptitle") else target.set_title)(text, fontsize=fontsize)


def save_figure(fig, path, dpi):
    """Write a figure as PNG atomically (never a 0-byte or half-written picture), then free it."""
    try:
        gt.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        _plt().close(fig)


def _density(values, grid):
    """Gaussian kernel density with Scott's bandwidth (a floor keeps one-valued sets visible)."""
    values = np.asarray(values, float)
    bw = max(1.06 * values.std() * len(values) ** -0.2, 0.01)
    return np.exp(-0.5 * ((grid[:, None] - values[None]) / bw) ** 2).sum(1) / (len(values) * bw * np.sqrt(2 * np.pi))


def _finish(ax, xlabel, ylabel=""):
    """Axis labels, and the legend where a line has a label (an empty legend is a matplotlib warning)."""
    ax.set(xlabel=xlabel, ylabel=ylabel)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def figure_4(rs, dataset):
    """Figure 4: each score's density per model over the runs of the paper's grid, cut at the score's range; points
    alone for a model with fewer than 3 runs. -> the figure, or None."""
    grid_runs = [m for m in rs if on_paper_grid(m)]
    scores = [k for k in sorted(SCORES, key=lambda k: k != "group_mig") if any(k in m for m in grid_runs)]
    if not grid_runs:
        return None
    cols = min(len(scores), 4)
    fig, axes = _figure(cols, 4.5, 3.3, rows=-(-len(scores) // cols))
    for ax in axes.flat[len(scores):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, scores):
        values, (lo, hi) = [m[key] for m in grid_runs if key in m], RANGE.get(key, (0.0, 1.0))
        grid = np.linspace(max(lo, min(values) - 0.05), min(hi, max(values) + 0.05), 300)  # never past the range
        for model in sorted({m["model"] for m in grid_runs}, key=_order):
            v, color = [m[key] for m in grid_runs if m["model"] == model and key in m], _color(model)
            if len(v) >= 3:
                ax.plot(grid, _density(v, grid), color=color, label=f"{model} (n={len(v)})")
                ax.fill_between(grid, _density(v, grid), color=color, alpha=0.15)
                ax.plot(v, np.zeros(len(v)), "|", color=color, ms=12)
            elif v:
                ax.plot(v, np.zeros(len(v)), "o", color=color, ms=6, label=f"{model} (n={len(v)}, points)")
        ax.set_xlim(grid[0], grid[-1])
        ax.set_title(f"{SCORES[key]} ({len(values)} runs)", fontsize=9)
        _finish(ax, f"{SCORES[key]} (higher is better)")
    others = len(rs) - len(grid_runs)
    _title(fig, f"Figure 4, {dataset}: each score's density per model over the {len(grid_runs)} runs of the paper's "
                "grid (group-tcVAE's beta x gamma at TC inter, the baselines' betas; group pairs)"
                + (f"; {others} other runs not shown" if others else ""), 4.5 * cols)
    return fig


def figure_3b(rs, dataset):
    """Figure 3(b): group-MIG of the content and of the non-content factors over the baselines' runs of the paper's
    grid. -> the figure, or None."""
    base = [m for m in rs if on_paper_grid(m) and gt.MODELS[m["model"]].baseline]
    models = sorted({m["model"] for m in base}, key=_order)
    if not base:
        return None
    fig, axes = _figure(1, max(5.5, 1.4 * len(models)), 3.6)
    ax, ticks = axes[0, 0], []
    for model in models:
        parts = [split_group_mig(m) for m in base if m["model"] == model]
        for j, name in enumerate(("content", "non-content")):
            v, x = [p[j] for p in parts], len(ticks)
            ax.boxplot([v], positions=[x], widths=0.6)
            ax.plot(x + np.linspace(-0.15, 0.15, len(v)), v, "o", color=_color(model), alpha=0.7, ms=4)
            ticks.append(f"{model}\n{name}")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(range(len(ticks)), ticks, fontsize=8)
    _finish(ax, "", "group-MIG")
    betas = ", ".join(_number(b) for b in sorted({m["beta"] for m in base}))
    _title(ax, f"Figure 3(b), {dataset}: group-MIG of the content vs the non-content factors\n(the baselines' "
               f"{len(base)} runs of the paper's grid, beta {betas})", fig.get_figwidth())
    return fig


def figure_3c(rs, dataset):
    """Figure 3(c): the baselines' MIG against the observations per group, at the betas each model was run at with
    larger groups (its pairs at the same betas); drawn only with runs of two group sizes or more."""
    base = [m for m in rs if "mig" in m and on_paper_grid(m, any_group_size=True) and gt.MODELS[m["model"]].baseline]
    if len({m.get("group_size", 2) for m in base}) < 2:
        return None
    fig, axes = _figure(1, 5.5, 3.6)
    ax = axes[0, 0]
    for model in sorted({m["model"] for m in base}, key=_order):
        own = [m for m in base if m["model"] == model]
        betas = {m["beta"] for m in own if m.get("group_size", 2) != 2} or {m["beta"] for m in own}
        by_size = collections.defaultdict(list)
        for m in own:
            if m["beta"] in betas:
                by_size[m.get("group_size", 2)].append(m["mig"])
        sizes = sorted(by_size)
        for s in sizes:
            ax.plot(np.full(len(by_size[s]), s), by_size[s], "o", color=_color(model), alpha=0.4, ms=4)
        ax.errorbar(sizes, [np.mean(by_size[s]) for s in sizes], [np.std(by_size[s]) for s in sizes],
                    color=_color(model), marker="s", capsize=3,
                    label=f"{model} (beta {', '.join(_number(b) for b in sorted(betas))})")
    _finish(ax, "observations per group (--group-size)", "MIG")
    _title(ax, f"Figure 3(c), {dataset}: the baselines' MIG against the group size (each run a dot; mean and sd per "
               "size, at the betas in the legend)", 5.5)
    return fig


def _scores_csv(folder):
    """A run's scores over training (its scores.csv), whole rows only; [] where it has none."""
    path = Path(folder) / "scores.csv"
    try:
        return [r for r in csv.DictReader(_read(path).decode().splitlines()) if gt.whole_row(r)] \
            if os.path.lexists(path) else []
    except (OSError, ValueError, csv.Error) as error:
        _err(f"leaving out {_shown(path)}: {getattr(error, 'strerror', None) or error}")
        return []


def figure_scores(rs, dataset):
    """Scores over training (--eval-every): per setting, the mean over seeds (thick) and each seed (thin); a colour
    per model, a line style per setting of a model. -> the figure, or None."""
    logs = {id(m): rows for m in rs if (rows := _scores_csv(m["path"]))}
    settings = sorted({setting(m) for m in rs if id(m) in logs}, key=_order)
    if not settings:
        return None
    fig, axes = _figure(len(PAPER_SCORES), 5.5, 4.2)
    for ax, key in zip(axes[0], PAPER_SCORES):
        for row in settings:
            model = row[0].split()[0]
            style = ("-", "--", ":", "-.")[[s for s in settings if s[0].split()[0] == model].index(row) % 4]
            curves = [{int(r["step"]): float(r[key]) for r in logs[id(m)] if r.get(key)}
                      for m in rs if id(m) in logs and setting(m) == row]
            for c in curves:
                ax.plot(sorted(c), [c[t] for t in sorted(c)], color=_color(model), ls=style, lw=0.6, alpha=0.5)
            common = sorted(set.intersection(*(set(c) for c in curves)))
            ax.plot(common, [np.mean([c[t] for c in curves]) for t in common], color=_color(model), ls=style, lw=2,
                    marker=".", label=f"{row[0]} beta {_number(row[1])}"
                    + (f" gamma {_number(row[2])}" if row[2] else "") + f" (n={len(curves)})")
        _title(ax, f"{SCORES[key]} over training, {dataset} (per setting: mean over seeds; thin: each seed)", 5.5)
        _finish(ax, "step")
    return fig


def _our_out(out):
    """The figures an earlier summary of ours left in `out` (to be written anew); UserError if `out` holds a
    results.md, or figures, that this program did not write."""
    results, figures = out / "results.md", [p for kind in FIGURES for p in sorted(out.glob(f"{kind}_*.png"))]
    if os.path.lexists(results):
        try:
            why = f"its first line is not {MARK}" if _read(results).split(b"\n", 1)[0] != MARK.encode() else None
        except (OSError, ValueError) as error:
            why = getattr(error, "strerror", None) or error
        if why:
            raise gt.UserError(f"{_shown(results)} was not written by compare.py summarize ({why}); it is left as it "
                               "is: give --out another folder")
    elif figures:
        raise gt.UserError(f"{_shown(out)} holds {figures[0].name}, and no results.md of compare.py summarize beside "
                           "it; it is left as it is: give --out another folder")
    return figures


def summarize(runs_dir, out=None):
    """results.md, Figures 4, 3(b), 3(c) and the scores over training, per data set, from every metrics.json under
    runs_dir, into `out` (default runs_dir/summary), over files of its own only. -> the lines of results.md."""
    runs_dir = Path(runs_dir)
    out = runs_dir / "summary" if out is None else Path(out)
    if not runs_dir.is_dir():
        raise gt.UserError(f"summarize: {_shown(runs_dir)} is not a folder; point it at a folder of runs")
    if os.path.lexists(out) and not out.is_dir():
        raise gt.UserError(f"summarize: --out {_shown(out)} is not a folder; give --out a folder (or leave it out)")
    stale = _our_out(out) if out.is_dir() else []
    runs, unfinished = load_runs(runs_dir)
    if not runs:
        raise gt.UserError(f"summarize: no finished run under {_shown(runs_dir)} (no metrics.json at its --steps); "
                           "point it at a folder of finished runs")
    datasets = sorted({m["dataset"] for m in runs})
    lines = [MARK, f"# Results: {len(runs)} runs under {_shown(runs_dir)}"
             + (f" ({len(unfinished)} more unfinished)" if unfinished else ""), "",
             "Scores as disentanglement_lib computes them, on encoder means (MIG: its discrete estimator, 20 bins; "
             "docs/metrics.md).", ""]
    for dataset in datasets:
        lines += results_table([m for m in runs if m["dataset"] == dataset], dataset,
                               [u for u in unfinished if u["dataset"] == dataset])
    for dataset in sorted({u["dataset"] for u in unfinished} - set(datasets)):
        lines += [f"## {dataset}", "", unfinished_line([u for u in unfinished if u["dataset"] == dataset],
                                                       "No run finished yet. Unfinished"), ""]
    text = _shown("\n".join(lines) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    for p in stale:
        p.unlink()
    gt.write_text_atomic(out / "results.md", text)  # first: the figures beside it are its own from now on
    drawn = []
    for dataset in datasets:
        rs = [m for m in runs if m["dataset"] == dataset]
        steps = max(m["steps"] for m in rs)  # a figure pools runs of one length: the longest
        if any(m["steps"] != steps for m in rs):
            _err(f"{dataset}: the figures show the {sum(m['steps'] == steps for m in rs)} runs of {steps:,} steps, "
                 f"not the {sum(m['steps'] != steps for m in rs)} shorter ones (the tables have them)")
            rs = [m for m in rs if m["steps"] == steps]
        off = [m for m in rs if not on_paper_grid(m)]
        if off:
            _err(f"{dataset}: Figures 4 and 3(b) leave out {len(off)} runs off the paper's grid ("
                 + "; ".join(sorted({f"{run_label(m)} beta {_number(m['beta'])} gamma {_number(m['gamma'])}"
                                     for m in off})) + "); the tables have them")
        for kind, draw in zip(FIGURES, (figure_4, figure_3b, figure_3c, figure_scores)):
            if fig := draw(rs, dataset):
                save_figure(fig, out / f"{kind}_{dataset}.png", 110)
                drawn.append(f"{kind}_{dataset}.png")
    sys.stdout.write(text.encode(sys.stdout.encoding or "utf-8", "backslashreplace").decode(sys.stdout.encoding
                                                                                            or "utf-8"))
    _err(f"wrote results.md{' and ' + ', '.join(drawn) if drawn else ''} to {_shown(out)}")
    return lines


# === Command line =====================================================================================================
def _metrics_flag(text):
    names = list(METRICS) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    if not names or set(names) - set(METRICS):
        raise argparse.ArgumentTypeError(f"unknown metric {', '.join(n for n in names if n not in METRICS) or '(none)'}"
                                         f"; expected all, or some of {', '.join(METRICS)} separated by commas")
    return tuple(dict.fromkeys(names))


def build_parser():
    p = argparse.ArgumentParser(prog="compare.py", description="The field's scores of grouptc.py's runs, and the "
                                "summary of a grid of them (results.md, Figures 3(b), 3(c), 4).")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="add DCI, SAP, modularity and the FactorVAE score to runs' metrics.json")
    s.add_argument("runs", nargs="+", metavar="RUN", help="run folders (each with checkpoint.pt and metrics.json)")
    s.add_argument("--metrics", type=_metrics_flag, default=METRICS, help="all, or some of dci, sap, modularity, "
                   "factor_vae separated by commas (default: all; on a CPU dci takes about 25 s, factor_vae minutes)")
    s.add_argument("--data-dir", default=None, help="folder of the official data files (default: each run's own)")
    m = sub.add_parser("summarize", help="results.md and Figures 3(b), 3(c), 4 of every finished run under RUNS_DIR")
    m.add_argument("runs_dir", metavar="RUNS_DIR")
    m.add_argument("--out", default=None, help="folder for results.md and the figures (default: RUNS_DIR/summary); "
                   "a results.md there that this program did not write is never replaced")
    return p


def main(argv=None):
    """-> the exit status: 0; 1: some run not scored, or a failed write or read; 2: bad input; 130: Ctrl-C."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "score":
            return score(args.runs, args.metrics, args.data_dir)
        summarize(args.runs_dir, args.out)
        return 0
    except (gt.UserError, OSError) as error:  # the one place where bad input, or a failed write or read, is a line
        _err(_failure(error))
        return getattr(error, "exit_code", 1)
    except KeyboardInterrupt:
        _err("\ninterrupted; every file written so far is whole (each is written at once or not at all)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
