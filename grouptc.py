"""grouptc: weakly-supervised group disentanglement using total correlation (group-tcVAE), in one file.

Paper: L. Tran, S. Asgari Taghanaki, A. H. Khasahmadi, A. Sanghi, "Weakly-supervised group disentanglement using
total correlation" (Autodesk AI Lab). Baselines: MLVAE (Bouchacourt et al. 2018) and GVAE (Hosoya 2019), with the
conventions of disentanglement_lib (Locatello et al. 2020) wherever the paper is silent.

The models learn from groups of observations (pairs) that share every factor of one group of factors: the content
group c, or the rest \\c. The code splits the same way, z = (z_\\c, z_c). group-tcVAE adds to each observation's
ELBO a total correlation penalty between z_c and z_\\c (a discriminator D estimates it) and a KL term that pulls
the members' posteriors over the shared group's dims together.

Run:
    python grouptc.py --model group_tcvae --dataset dsprites               # the official file, downloaded if missing
    python grouptc.py --model group_tcvae --dataset dsprites_procedural    # built-in renderer, no download
    python grouptc.py --eval-only --out RUN --eval-samples 0               # re-evaluate a saved run on all points
    python grouptc.py --summarize runs/                                    # Figure 3(b), 3(c), 4 and results.md
    python grouptc.py --dataset dsprites_procedural --seed 0,1,2 --gamma 1,8   # a sweep: 6 runs trained together

Where each quantity of the paper lives:
    groups of observations .................. sample_groups(); Locatello et al.'s pairs: sample_k_factor_pairs()
    Eq. (1)  WS-ELBO of MLVAE / GVAE ........ group_objective(), with product_posterior() / average_posterior()
             Ada-GVAE / Ada-ML-VAE ......... the same, on the dims adaptive_shared_dims() infers per pair
    Eq. (2)  TC(z_c, z_\\c) ................... tc_estimate() with the discriminator D; q-bar samples: permute_codes()
             the three factorisations ......... tc_blocks()  (inter | inter_intra | full)
    Eq. (3)  group-tcVAE objective ............ group_objective(): reconstruction(), kl_to_prior(), tc_estimate(),
                                                group_kl()
             discriminator loss ............... discriminator_loss()
    one training step (VAE, then D) ......... train_step()
    Sec. 4   MIG, group-MIG ................... mutual_info_matrix(), mig(), group_mig()
             the field's other scores (not the paper's) dci(), sap(), modularity(), factor_vae_score()
    Fig. 3a  MI matrix ........................ plot_mi_matrix()
    Fig. 3b, 3c, 4 ............................ figure_3b(), figure_3c(), figure_4(), via summarize()
    Fig. 5   reconstructions, traversals ...... plot_reconstructions(), plot_traversals()

Use it as a library (README, "Use it in your own code", has a complete example):
    classes, shares_content = sample_groups(data.factor_sizes, content_factors, 32, generator=g)  # (32, 2, K)
    x = data.images(classes.flatten(0, 1)).view(32, 2, C, 64, 64)  # or your own images of those classes
    terms = train_step(vae, D, vae_opt, d_opt, x, shares_content, "group_tcvae", beta=10, gamma=8, content_dims=5)
    mig(codes, factors), group_mig(codes, factors, content_latents, content_factors)   # numpy (N, L), (N, K)

Sections: the method (group sampler -> model -> objectives -> metrics -> the training step), then the machinery
(sweeps -> run folders -> data sources -> arguments -> the training loop -> the field's other scores ->
evaluation and figures -> summary -> command line).
"""

import argparse
import collections
import concurrent.futures
import contextlib
import csv
import errno
import functools
import hashlib
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import sys
import time
import urllib.request
from pathlib import Path

try:
    import fcntl  # run-folder locks (POSIX); on other systems runs are not locked
except ImportError:  # pragma: no cover
    fcntl = None

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

TC_LEVELS = ("inter", "inter_intra", "full")


# ================================================================================================================
# THE METHOD
# ================================================================================================================

# ----------------------------------------------------------------------------------------------------------------
# The group sampler: groups of observations that share every factor of one group of factors.
# ----------------------------------------------------------------------------------------------------------------
# A group shares the content factors or the others (probability 1/2 each); the factors of the other group are drawn
# anew for every member. Factors live in "class space": an integer class per factor, (..., K).
@functools.lru_cache(maxsize=None)
def device_constant(values, device, dtype=torch.long):
    """A small constant tensor made once per device: the training step then copies nothing from the host (which
    also lets the step be captured in a CUDA graph). `values` is a tuple; the tensor must not be modified."""
    return torch.tensor(values, device=device, dtype=dtype)


def uniform_classes(factor_sizes, shape, generator=None):
    """Factor classes drawn uniformly and independently: -> LongTensor (*shape, K) on the generator's device."""
    device = generator.device if generator is not None else torch.device("cpu")
    sizes = device_constant(tuple(factor_sizes), device)
    u = torch.rand(*shape, len(factor_sizes), generator=generator, device=device, dtype=torch.float64)
    return torch.minimum((u * sizes).long(), sizes - 1)  # the min guards u * size rounding up to size


def some_not_all(indices, n):
    """Whether `indices` are distinct whole numbers naming some, not all, of 0 .. n-1 (content factors, latents)."""
    indices = list(indices)
    return (bool(indices) and all(isinstance(i, (int, np.integer)) and 0 <= i < n for i in indices)
            and len(set(indices)) == len(indices) < n)


def sample_groups(factor_sizes, content_factors, batch_size, group_size=2, generator=None):
    """-> classes (batch_size, group_size, K) LongTensor, shares_content (batch_size,) BoolTensor.
    content_factors: indices of the content factors. Every draw comes from `generator` and lives on its device, so
    a seed reproduces the batch."""
    device = generator.device if generator is not None else torch.device("cpu")
    K = len(factor_sizes)
    if not some_not_all(content_factors, K):
        raise ValueError(f"content_factors {content_factors} must be indices of some, not all, of the {K} factors")
    classes = uniform_classes(factor_sizes, (batch_size, group_size), generator)  # independent for every member
    shares_content = torch.rand(batch_size, generator=generator, device=device) < 0.5
    is_content = device_constant(tuple(k in content_factors for k in range(K)), device, torch.bool)
    shared = is_content[None] == shares_content[:, None]  # (B, K): the factors this group shares
    classes = torch.where(shared[:, None, :], classes[:, :1, :], classes)  # copy the first member's classes
    return classes, shares_content


def sample_k_factor_pairs(factor_sizes, batch_size, k=None, exact=False, generator=None):
    """Locatello et al. (2020)'s pairs: the first image's factors uniform; the second resamples some of them.
    k: 1 .. K-1, or None for "rnd" (drawn per pair, uniform on 1 .. K-1).
    exact=False, as disentanglement_lib's simple_dynamics (the procedure behind the published numbers): 1 or k
    distinct factors (probability 1/2 each) get a new value drawn uniformly, which may equal the old one.
    exact=True, as the paper's text says: exactly k distinct factors, each to a different value (factors with one
    value never change).
    -> classes (batch_size, 2, K) LongTensor, resampled (batch_size, K) BoolTensor: the factors drawn anew."""
    device = generator.device if generator is not None else torch.device("cpu")
    K = len(factor_sizes)
    if k is not None and not 1 <= k < K:
        raise ValueError(f"k must be in 1..{K - 1} (or None for a k drawn per pair), got {k}")
    first = uniform_classes(factor_sizes, (batch_size,), generator)  # (B, K)
    if k is None:
        k = 1 + (torch.rand(batch_size, generator=generator, device=device) * (K - 1)).long().clamp(max=K - 2)
    else:
        k = torch.full((batch_size,), k, device=device)
    sizes = device_constant(tuple(factor_sizes), device)
    if exact:  # exactly k of the factors that can change; each takes one of its other values, uniformly
        k = torch.minimum(k, (sizes > 1).sum())
        keys = torch.rand(batch_size, K, generator=generator, device=device).masked_fill(sizes == 1, 2.0)
        shift = 1 + (torch.rand(batch_size, K, generator=generator, device=device) * (sizes - 1)).long()
        new = (first + torch.minimum(shift, (sizes - 1).clamp(min=1))) % sizes
    else:  # choice([1, k]), then that many distinct factors, each resampled uniformly
        k = torch.where(torch.rand(batch_size, generator=generator, device=device) < 0.5, 1, k)
        keys = torch.rand(batch_size, K, generator=generator, device=device)
        new = uniform_classes(factor_sizes, (batch_size,), generator)
    cut = keys.sort(1).values.gather(1, (k - 1)[:, None])  # the k-th smallest key of each pair
    resampled = keys <= cut  # k distinct factors, chosen uniformly
    return torch.stack([first, torch.where(resampled, new, first)], 1), resampled


# ----------------------------------------------------------------------------------------------------------------
# Model: disentanglement_lib's conv encoder / deconv decoder (64x64 inputs), and the FactorVAE discriminator D.
# ----------------------------------------------------------------------------------------------------------------
# The latent z = (z_\c, z_c): z_\c the first latent_dim - content_dims dims, z_c the last content_dims (Fig. 3a).
class VAE(nn.Module):
    def __init__(self, channels=1, latent_dim=10):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, 32, 4, 2, 1), nn.ReLU(),  # 32x32
            nn.Conv2d(32, 32, 4, 2, 1), nn.ReLU(),  # 16x16
            nn.Conv2d(32, 64, 2, 2), nn.ReLU(),  # 8x8
            nn.Conv2d(64, 64, 2, 2), nn.ReLU(),  # 4x4
            nn.Flatten(), nn.Linear(1024, 256), nn.ReLU(),
            nn.Linear(256, 2 * latent_dim))  # mean and log-variance heads, as one layer
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 256), nn.ReLU(), nn.Linear(256, 1024), nn.ReLU(), nn.Unflatten(1, (64, 4, 4)),
            nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.ReLU(),  # 8x8
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),  # 16x16
            nn.ConvTranspose2d(32, 32, 4, 2, 1), nn.ReLU(),  # 32x32
            nn.ConvTranspose2d(32, channels, 4, 2, 1))  # 64x64 logits

    def encode(self, x):
        """(N, C, 64, 64) -> mu, logvar, each (N, L)."""
        return self.encoder(x).chunk(2, dim=-1)

    def decode(self, z):
        """(N, L) -> (N, C, 64, 64) Bernoulli logits."""
        return self.decoder(z)


class Discriminator(nn.Module):
    """FactorVAE's D: 6 hidden layers of 1000, LeakyReLU(0.2), 2 logits (0: joint q(z), 1: factorised q-bar(z))."""

    def __init__(self, latent_dim=10, hidden=1000, layers=6):
        super().__init__()
        sizes = [latent_dim] + [hidden] * layers
        blocks = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            blocks += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*blocks, nn.Linear(hidden, 2))

    def forward(self, z):
        return self.net(z)


# ----------------------------------------------------------------------------------------------------------------
# Objectives: one small function per quantity of the paper, assembled in group_objective().
# ----------------------------------------------------------------------------------------------------------------
# Shapes: B groups, G observations per group, L latent dims; mu, logvar (B, G, L).
def reconstruction(logits, x):
    """-log p(x|z), Bernoulli on logits, summed over pixels: (N, C, H, W) x2 -> (N,)."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def kl_to_prior(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)) per dim: (..., L) -> (..., L)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)


def gaussian_kl(mu1, logvar1, mu2, logvar2):
    """KL(N(mu1, var1) || N(mu2, var2)) per dim, broadcasting."""
    return 0.5 * (logvar2 - logvar1 + (logvar1.exp() + (mu1 - mu2).pow(2)) / logvar2.exp() - 1)


def average_posterior(mu, logvar):
    """GVAE (Hosoya 2019): the group's posterior averages the members' means and VARIANCES over G:
    (B, G, L) -> (B, 1, L)."""
    return mu.mean(1, keepdim=True), logvar.exp().mean(1, keepdim=True).log()


def product_posterior(mu, logvar):
    """MLVAE (Bouchacourt 2018): the normalised product of the members' Gaussians: precision-weighted mean,
    variance 1 / sum(1 / var_i). (B, G, L) -> (B, 1, L).
    NOTE: disentanglement_lib uses 2*v1*v2/(v1+v2) for pairs, twice this variance; we use the true product, as
    Bouchacourt et al. define it (the test checks it against the closed form)."""
    precision = (-logvar).exp()  # (B, G, L)
    var = 1.0 / precision.sum(1, keepdim=True)
    return var * (mu * precision).sum(1, keepdim=True), var.log()


def group_kl(mu, logvar, shared):
    """gamma's term of Eq. (3): KL between the members' posteriors over the dims of the shared group, both
    directions, averaged over the G(G-1) ordered pairs of a group (for a pair: (KL(q1||q2) + KL(q2||q1)) / 2,
    the per-image share of the sum over z~ in {z, z'}), summed over dims, averaged over groups.
    mu, logvar (B, G, L); shared (B, L) bool -> scalar."""
    G = mu.shape[1]
    kl = gaussian_kl(mu[:, :, None], logvar[:, :, None], mu[:, None], logvar[:, None])  # (B, G, G, L), diag 0
    return (kl * shared[:, None, None]).sum((1, 2, 3)).mean() / (G * (G - 1))


@functools.lru_cache(maxsize=None)
def tc_blocks(level, latent_dim, content_dims):
    """Which dims are permuted together to sample the factorised q-bar of each TC level (Sec. 3), as a block id per
    dim (z_\\c first, z_c last): inter: [z_\\c][z_c]; inter_intra: every z_\\c dim alone, z_c one block; full:
    every dim alone (FactorVAE). -> tuple of L ints."""
    n_s = latent_dim - content_dims
    if level == "inter":
        return (0,) * n_s + (1,) * content_dims
    if level == "inter_intra":
        return tuple(range(n_s)) + (n_s,) * content_dims
    if level == "full":
        return tuple(range(latent_dim))
    raise ValueError(f"unknown TC level {level!r}; expected one of {', '.join(TC_LEVELS)}")


def permute_codes(z, blocks, generator=None, u=None):
    """Samples of q-bar: each block of dims gets its own random permutation of the N codes (rows).
    z (N, L), blocks: L block ids in [0, L) (tc_blocks()) -> (N, L). u: the (N, L) uniform noise that orders the
    permutations, drawn from `generator` when not given."""
    u = torch.rand(z.shape, generator=generator, device=z.device) if u is None else u
    perm = u.argsort(0)  # (N, L): one permutation per possible block
    return z.gather(0, perm[:, device_constant(tuple(blocks), z.device)])  # a block's dims share its permutation


def tc_estimate(logits):
    """Density-ratio trick (Kim & Mnih 2018): TC ~= E_q[log D_joint(z) - log D_factorised(z)] = mean of the
    logit difference. logits (N, 2) -> scalar. Computed in fp32."""
    logits = logits.float()
    return (logits[:, 0] - logits[:, 1]).mean()


def discriminator_loss(D, z, z_perm):
    """D's loss on DETACHED codes, 0.5 * (CE(D(z), joint) + CE(D(z_perm), factorised)); also its accuracy."""
    logits = D(torch.cat([z.detach(), z_perm.detach()])).float()
    target = torch.cat([torch.zeros(len(z), dtype=torch.long, device=z.device),
                        torch.ones(len(z_perm), dtype=torch.long, device=z.device)])
    return F.cross_entropy(logits, target), (logits.argmax(1) == target).float().mean()


def shared_dims(shares_content, latent_dim, content_dims):
    """(B,) bool -> (B, L) bool: the latent dims of the group each group of observations shares."""
    is_content = torch.arange(latent_dim, device=shares_content.device) >= latent_dim - content_dims
    return is_content[None] == shares_content[:, None]


def adaptive_shared_dims(mu, logvar):
    """Ada-GVAE / Ada-ML-VAE (Locatello et al. 2020): the dims a pair shares, inferred from the pair itself. Per
    dim, delta_j = KL(q(z_j|x1) || q(z_j|x2)) (one-sided, as disentanglement_lib, whose factor 2 changes nothing);
    the dims whose delta lies strictly below the midpoint of the pair's smallest and largest delta are shared.
    NOTE: when every delta is equal (identical images) nothing is shared; disentanglement_lib divides 0 by 0 there.
    mu, logvar (B, 2, L) -> (B, L) bool (a mask: no gradient flows through it)."""
    delta = gaussian_kl(mu[:, 0], logvar[:, 0], mu[:, 1], logvar[:, 1]).detach()  # (B, L)
    return delta < (delta.min(1, keepdim=True).values + delta.max(1, keepdim=True).values) / 2


OBJECTIVES = ("group_tcvae", "mlvae", "gvae", "ada_gvae", "ada_mlvae")  # what group_objective() computes
ADAPTIVE = ("ada_gvae", "ada_mlvae")  # the models that infer the shared dims (pairs only; shares_content unused)


def group_objective(model, vae, D, x, shares_content, beta, gamma, content_dims, generator=None, eps=None):
    """The loss of one batch of groups, for each model. Returns (loss, terms, z): terms holds each term's value per
    image; z (B*G, L) the sampled codes (D's training data).

    model: "group_tcvae" (Eq. 3), "mlvae" or "gvae" (Eq. 1), "ada_gvae" or "ada_mlvae" (Locatello et al. 2020:
    GVAE / MLVAE on the dims adaptive_shared_dims() infers from each pair). vae: anything with encode(x) ->
    (mu, logvar), each (N, L), and decode(z) -> Bernoulli logits shaped like x. D: the discriminator (group-tcVAE
    only; None for the others), called on codes (N, L) -> logits (N, 2); the caller freezes its parameters
    (train_step does).
    x (B, G, C, H, W): B groups of G observations; shares_content (B,) bool: whether each group shares the content
    factors (else the others; unused by the Ada models, which may be given None). The code is z = (z_\\c, z_c): z_c
    is its LAST content_dims dims.
    beta: group-tcVAE: the weight of TC(z_c, z_\\c) (the prior KL has weight 1); the others: the weight of the KL
    of the (aggregated) posterior to N(0, I). gamma: group-tcVAE: the weight of the group KL; unused otherwise.
    eps (B, G, L): the reparameterisation noise, drawn from `generator` when not given.
    Every term is per image: the paper's sums over the G members of a group are averaged instead, as
    disentanglement_lib's 0.5 * (rec1 + rec2) does, so beta and gamma keep their meaning for any G."""
    if model not in OBJECTIVES:
        raise ValueError(f"unknown model {model!r}; expected one of {', '.join(OBJECTIVES)}")
    adaptive = model in ADAPTIVE
    if x.dim() != 5 or x.shape[1] < 2 or not adaptive and (shares_content is None or
                                                            tuple(shares_content.shape) != (x.shape[0],)):
        raise ValueError(f"expected x (B, G >= 2, C, H, W) and shares_content (B,), got {tuple(x.shape)} and "
                         f"{None if shares_content is None else tuple(shares_content.shape)}")
    if adaptive and x.shape[1] != 2:
        raise ValueError(f"{model} learns from pairs; got groups of {x.shape[1]}")
    if model == "group_tcvae" and D is None:
        raise ValueError("group_tcvae needs the discriminator D")
    B, G = x.shape[:2]
    mu, logvar = (t.float().view(B, G, -1) for t in vae.encode(x.flatten(0, 1)))
    if not 0 < content_dims < mu.shape[-1]:
        raise ValueError(f"content_dims must be in 1..{mu.shape[-1] - 1} (both latent groups non-empty), got "
                         f"{content_dims}")
    # (B, L): the dims of the group each group shares; the Ada models infer them from the pair
    shared = adaptive_shared_dims(mu, logvar) if adaptive else shared_dims(shares_content, mu.shape[-1], content_dims)
    if model != "group_tcvae":
        # Eq. (1): the shared dims take the group's aggregated posterior (both members the same); the others keep
        # their own.
        mu_g, logvar_g = (product_posterior if model in ("mlvae", "ada_mlvae") else average_posterior)(mu, logvar)
        mu, logvar = torch.where(shared[:, None], mu_g, mu), torch.where(shared[:, None], logvar_g, logvar)
    eps = torch.randn(mu.shape, generator=generator, device=mu.device) if eps is None else eps
    z = (mu + eps * (0.5 * logvar).exp()).flatten(0, 1)  # (B*G, L), reparameterised
    rec = reconstruction(vae.decode(z).float(), x.flatten(0, 1)).mean()
    kl = kl_to_prior(mu, logvar).sum(-1).mean()
    if adaptive:
        return rec + beta * kl, {"rec": rec, "kl": kl, "shared_dims": shared.float().sum(1).mean()}, z
    if model != "group_tcvae":
        return rec + beta * kl, {"rec": rec, "kl": kl}, z  # Eq. (1)
    # Eq. (3), read as a loss to minimise. NOTE: as printed, Eq. (3) subtracts (beta*TC - gamma*KL), which would
    # REWARD a large KL between the shared latents; the text says that term pulls them together, so it is added.
    with torch.autocast(z.device.type, enabled=False):
        tc = tc_estimate(D(z.float()))  # gradients reach the encoder; D's own parameters are frozen by the caller
    gkl = group_kl(mu, logvar, shared)
    return rec + kl + beta * tc + gamma * gkl, {"rec": rec, "kl": kl, "tc": tc, "group_kl": gkl}, z
# ----------------------------------------------------------------------------------------------------------------
# Metrics: disentanglement_lib's discrete MIG, and the paper's group-MIG, on the same plug-in MI estimator.
# ----------------------------------------------------------------------------------------------------------------
# The histogram MI is Numba-jitted (cached on disk, compiled once).
_mi_kernel = None


def _get_mi_kernel():
    """Compile (or load from Numba's cache) the two Numba kernels, the joint histograms and the columns' ranges, on
    first use: `import grouptc` stays fast."""
    global _mi_kernel
    if _mi_kernel is None:
        import numba

        @numba.njit(parallel=True, cache=True)
        def kernel(codes, edges, factors, n_classes, n_chunks):
            """codes (N, L) float64; edges (L, n_bins) left bin edges; factors (N, K) int64 in [0, n_classes);
            n_chunks: parts of N counted in parallel.
            -> (L, K) plug-in MI in nats of digitize(codes[:, i], edges[i]) and factors[:, k]; (K,) entropies."""
            N, L = codes.shape
            K = factors.shape[1]
            n_bins = edges.shape[1]
            inverse_width = np.empty(L)
            for i in range(L):
                inverse_width[i] = (n_bins - 1) / (edges[i, n_bins - 1] - edges[i, 0]) if n_bins > 1 else 0.0
            counts = np.zeros((n_chunks, L, K, n_bins + 1, n_classes), np.int64)  # joint tables: bin label x class
            for chunk in numba.prange(n_chunks):
                for n in range(chunk * N // n_chunks, (chunk + 1) * N // n_chunks):
                    for i in range(L):
                        x, e = codes[n, i], edges[i]
                        # numpy.digitize(x, e) = the number of left edges <= x, in 1..n_bins: guess it from the
                        # bin width, then step to the exact answer against the very edges numpy made.
                        b = min(max(int((x - e[0]) * inverse_width[i]) + 1, 1), n_bins)
                        while b < n_bins and x >= e[b]:
                            b += 1
                        while b > 1 and x < e[b - 1]:
                            b -= 1
                        for k in range(K):
                            counts[chunk, i, k, b, factors[n, k]] += 1
            joint = counts.sum(axis=0)  # (L, K, n_bins + 1, vmax)
            mi, H = np.zeros((L, K)), np.zeros(K)
            for k in range(K):
                col = joint[0, k].sum(axis=0)  # (n_classes,) factor counts
                for v in range(n_classes):
                    if col[v] > 0:
                        H[k] -= col[v] / N * math.log(col[v] / N)
                for i in range(L):
                    total = 0.0
                    for b in range(1, n_bins + 1):
                        row = joint[i, k, b].sum()  # bin counts
                        for v in range(n_classes):
                            c = joint[i, k, b, v]
                            if c > 0:
                                total += c / N * (math.log(c * N) - math.log(row * col[v]))
                    mi[i, k] = total
            return mi, H

        @numba.njit(parallel=True, cache=True)
        def ranges(codes, n_chunks):
            """codes (N, L) float64 -> per-column min, max, and the count of NaN / infinite entries (one pass)."""
            N, L = codes.shape
            lo, hi = np.full((n_chunks, L), np.inf), np.full((n_chunks, L), -np.inf)
            bad = np.zeros(n_chunks, np.int64)
            for chunk in numba.prange(n_chunks):
                for n in range(chunk * N // n_chunks, (chunk + 1) * N // n_chunks):
                    for i in range(L):
                        x = codes[n, i]
                        if not np.isfinite(x):
                            bad[chunk] += 1
                        lo[chunk, i] = min(lo[chunk, i], x)
                        hi[chunk, i] = max(hi[chunk, i], x)
            return lo, hi, bad.sum()  # (n_chunks, L) each: the caller takes the min / max over chunks

        # Numba's OpenMP layer, starting its threads on the first parallel call, sets the process's OpenMP thread
        # count to every core, and that count is torch's too (OMP_NUM_THREADS notwithstanding): training after an
        # evaluation would run on other threads than asked, and sum in another order. Start them here, once, and
        # put torch's count back; after this no metric call changes it.
        threads = torch.get_num_threads()
        ranges(np.zeros((1, 1)), 1)
        torch.set_num_threads(threads)
        _mi_kernel = kernel, ranges
    return _mi_kernel


def _factor_labels(factors):
    """(N, K) integer classes -> (N, K) int64 labels and one bound n_classes > every label (classes are used as
    they are when they are small non-negative integers, else replaced by their rank); unused classes count 0."""
    factors = np.asarray(factors)
    if not np.issubdtype(factors.dtype, np.integer) or factors.ndim != 2:
        raise ValueError(f"factors must be an integer (N, K) array, got {factors.dtype} {factors.shape}")
    if len(factors) and factors.min() >= 0 and factors.max() < 1024:
        labels = np.ascontiguousarray(factors, dtype=np.int64)
    else:
        labels = np.stack([np.unique(f, return_inverse=True)[1].reshape(-1) for f in factors.T], 1).astype(np.int64)
    return labels, int(labels.max()) + 1 if labels.size else 1  # one bound: a per-column max is slow


def mutual_info_and_entropy(codes, factors, n_bins=20):
    """(L, K) plug-in MI in nats between each code dim, cut into n_bins equal-width bins between its min and max
    (numpy.histogram's edges, numpy.digitize's labels), and each factor; and the (K,) factor entropies.
    codes (N, L) float, factors (N, K) integer classes."""
    import numba
    codes = np.ascontiguousarray(codes, dtype=np.float64)
    if codes.ndim != 2 or len(codes) != len(factors) or len(codes) == 0:
        raise ValueError(f"codes must be (N, L) with N = len(factors) = {len(factors)} > 0, got {codes.shape}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    kernel, ranges = _get_mi_kernel()
    # As many threads as torch has, at most Numba's (OMP_NUM_THREADS=1: one). Numba's default, every core,
    # oversubscribes the cores when runs share them (run_paper.sh's JOBS), and each call then waits seconds on busy
    # cores. The counts are integers, so the result is the same for any number of threads.
    before, threads = numba.get_num_threads(), min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads())
    numba.set_num_threads(threads)
    try:
        lo, hi, n_bad = ranges(codes, threads)
        lo, hi = lo.min(0), hi.max(0)
        if n_bad:
            raise ValueError(f"codes contain {n_bad} NaN or infinite values")
        labels, n_classes = _factor_labels(factors)
        # numpy.histogram's edges: linspace(min, max, n_bins + 1), widened by 0.5 on each side for a constant dim.
        flat = lo == hi
        lo, hi = np.where(flat, lo - 0.5, lo), np.where(flat, hi + 0.5, hi)
        edges = np.stack([np.linspace(a, b, n_bins + 1)[:-1] for a, b in zip(lo, hi)])  # (L, n_bins)
        return kernel(codes, edges, labels, n_classes, threads)
    finally:
        numba.set_num_threads(before)


def mutual_info_matrix(codes, factors, n_bins=20):
    """(L, K) plug-in MI in nats between each binned code dim and each factor (see mutual_info_and_entropy)."""
    return mutual_info_and_entropy(codes, factors, n_bins)[0]


def gap_score(gaps, H):
    """MIG's and group-MIG's score from their (K,) gaps per factor: the mean over factors of gap / H(v_k), factors
    with one value (H = 0) left out."""
    keep = H > 0
    if not keep.any():
        raise ValueError("every factor has a single value in these points: no factor to score")
    return float(np.mean(gaps[keep] / H[keep]))


def mig_gaps(mi):
    """Per factor: the largest I(z_i; v_k) over the latents minus the second largest. (L, K) -> (K,)"""
    if len(mi) < 2:
        raise ValueError(f"MIG is a gap between two latents: codes need at least 2 columns, got {len(mi)}")
    top = np.sort(mi, axis=0)[::-1]
    return top[0] - top[1]


def group_gaps(mi, content_latents, content_factors):
    """Per factor: max I over the latents of the factor's own group - max I over the other latents. (L, K) -> (K,)"""
    L, K = mi.shape
    content_latents, content_factors = list(content_latents), list(content_factors)
    if not (some_not_all(content_latents, L) and some_not_all(content_factors, K)):
        raise ValueError(f"content_latents {content_latents} and content_factors {content_factors} must each name "
                         f"some, not all, of the {L} latents and {K} factors")
    own = np.isin(np.arange(L), content_latents)[:, None] == np.isin(np.arange(K), content_factors)[None, :]
    return np.where(own, mi, -np.inf).max(0) - np.where(~own, mi, -np.inf).max(0)


def mig(codes, factors, n_bins=20):
    """Mutual Information Gap (disentanglement_lib's discrete MIG): mean over factors of the gap between the two
    largest I(z_i; v_k), over H(v_k). Factors with one value are left out."""
    mi, H = mutual_info_and_entropy(codes, factors, n_bins)
    return gap_score(mig_gaps(mi), H)


def group_mig(codes, factors, content_latents, content_factors, n_bins=20):
    """group-MIG (paper, Sec. 4): mean over factors of (max I over the latents of the factor's own group - max I
    over the other latents) / H(v_k). Negative when information sits in the wrong group. content_latents: indices
    of the z_c dims (columns of `codes`); content_factors: indices of the content factors (columns of `factors`)."""
    mi, H = mutual_info_and_entropy(codes, factors, n_bins)
    return gap_score(group_gaps(mi, content_latents, content_factors), H)



# ----------------------------------------------------------------------------------------------------------------
# The training step: the VAE's update with D frozen, then D's update on the detached codes.
# ----------------------------------------------------------------------------------------------------------------
def train_step(vae, D, vae_opt, d_opt, x, shares_content, model="group_tcvae", beta=10.0, gamma=8.0, content_dims=5,
               tc_level="inter", generator=None, amp=False):
    """One optimisation step on one batch of groups x (B, G, C, H, W), shares_content (B,) (see group_objective).
    vae, D: modules (D and d_opt None for every model but group-tcVAE); vae_opt, d_opt: their optimisers. generator: the
    source of the reparameterisation noise and of the permutations. amp: bf16 autocast for the forward passes.
    Returns {term: detached scalar tensor}: loss and the objective's terms, then D's loss and accuracy; nothing
    waits for the device."""
    if model == "group_tcvae" and (D is None or d_opt is None):
        raise ValueError("group_tcvae trains a discriminator: give D and d_opt")
    if model == "group_tcvae" and tc_level not in TC_LEVELS:  # refused before the VAE's step, not after it
        raise ValueError(f"unknown TC level {tc_level!r}; expected one of {', '.join(TC_LEVELS)}")
    autocast = functools.partial(torch.autocast, x.device.type, dtype=torch.bfloat16, enabled=amp,
                                 cache_enabled=False)
    # 1. The VAE's step. D is frozen: the TC term's gradient reaches the encoder through D, never D itself.
    if D is not None:
        D.requires_grad_(False)
    with autocast():
        loss, terms, z = group_objective(model, vae, D, x, shares_content, beta, gamma, content_dims, generator)
    vae_opt.zero_grad(set_to_none=True)
    loss.backward()
    vae_opt.step()
    out = {"loss": loss.detach(), **{name: t.detach() for name, t in terms.items()}}
    if model != "group_tcvae":
        return out
    # 2. D's step: the codes of step 1, DETACHED (D's loss must not reach the encoder), against a fresh
    # permutation of them (samples of q-bar). FactorVAE ports that reuse D(z) after the VAE's optimiser has
    # stepped fail here with an in-place autograd error.
    D.requires_grad_(True)
    z = z.detach()
    with autocast():
        z_perm = permute_codes(z, tc_blocks(tc_level, z.shape[1], content_dims), generator)
        d_loss, d_acc = discriminator_loss(D, z, z_perm)
    d_opt.zero_grad(set_to_none=True)
    d_loss.backward()
    d_opt.step()
    return out | {"d_loss": d_loss.detach(), "d_acc": d_acc.detach()}


# ================================================================================================================
# THE MACHINERY: sweeps, run folders, data sources, arguments, the training loop, evaluation, figures, summary
# ================================================================================================================
# What the machinery knows of a model: its default beta and gamma, the terms train_step() returns for it (the
# columns of log.csv), its colour in the figures, and whether it is a baseline with an aggregated posterior (Figures
# 3b, 3c). A new model is an entry here and its branch in group_objective().
ModelSpec = collections.namedtuple("ModelSpec", "beta gamma terms color baseline")


MODELS = {
    # the paper's grid: beta {10..100}, gamma {1..64}; see README "Defaults"
    "group_tcvae": ModelSpec(10.0, 8.0, ("loss", "rec", "kl", "tc", "group_kl", "d_loss", "d_acc"), "tab:red", False),
    # Locatello et al. 2020's grid {1, 2, 4, 6, 8, 16}: its first value; gamma unused
    "mlvae": ModelSpec(1.0, 0.0, ("loss", "rec", "kl"), "tab:blue", True),
    "gvae": ModelSpec(1.0, 0.0, ("loss", "rec", "kl"), "tab:green", True),
    # the DL fork's weak grid {1, 2, 4, 6, 8, 16}: its first value; shared_dims: the mean number of dims a pair shares
    "ada_gvae": ModelSpec(1.0, 0.0, ("loss", "rec", "kl", "shared_dims"), "tab:purple", True),
    "ada_mlvae": ModelSpec(1.0, 0.0, ("loss", "rec", "kl", "shared_dims"), "tab:orange", True),
}
PAIRS = ("groups", "k_factors", "k_factors_exact")  # --pairs
DATASETS = ("dsprites", "shapes3d", "dsprites_procedural", "shapes3d_procedural")


# ----------------------------------------------------------------------------------------------------------------
# Runs and sweeps: a Run holds one run's networks, optimisers and generators; a Sweep trains S runs together.
# ----------------------------------------------------------------------------------------------------------------
def adam(params, net, device, capturable=False):
    """The optimisers of the reference code: the VAE's Adam(1e-4, (0.9, 0.999)), D's Adam(1e-4, (0.5, 0.9)).
    CUDA: fused and, for the CUDA graph, capturable (one kernel, inside the graph). CPU: the default Adam, which
    computes the runs of docs/cpu_study byte for byte (the fused one was 0-4% faster there and rounds differently)."""
    fused = {"fused": True, "capturable": capturable} if device.type == "cuda" else {}
    betas = (0.9, 0.999) if net == "vae" else (0.5, 0.9)
    return torch.optim.Adam(params, lr=1e-4, betas=betas, eps=1e-8, **fused)


class Run:
    """One run: its flags (args), its networks (always the trained weights) and optimisers (None while a
    StackedRuns holds their states), its generators and the step it stands at. Alone or in a sweep it computes the
    same thing: it draws from its own generators, seeded from its --seed."""

    def __init__(self, args, data, content_factors, device):
        self.args, self.data, self.content_factors, self.device = args, data, content_factors, device
        torch.manual_seed(args.seed)  # network initialisation
        self.vae = VAE(data.channels, args.latent_dim).to(device)
        self.D = Discriminator(args.latent_dim).to(device) if args.model == "group_tcvae" else None
        capturable = device.type == "cuda" and not args.eager
        self.vae_opt = adam(self.vae.parameters(), "vae", device, capturable)
        self.d_opt = adam(self.D.parameters(), "D", device, capturable) if self.D is not None else None
        self.data_gen = torch.Generator(device=device).manual_seed(args.seed)  # groups
        self.model_gen = torch.Generator(device=device).manual_seed(args.seed + 1_000_003)  # noise, permutations
        self.step, self.train_seconds = 0, 0.0
        self.threads = []  # the torch thread counts it trained with (the CPU's sums depend on them)
        self.machines = []  # and the torch builds and processors (machine()): the sums depend on them too
        if args.compile:  # in place: the parameter names stay, so checkpoints load either way
            for module in (self.vae.encoder, self.vae.decoder, self.D):
                if module is not None:
                    module.compile()

    def sample(self):
        """A fresh batch from the run's data generator: classes (B, G, K), and shares_content (B,) for the paper's
        groups (None for Locatello's k-factor pairs, which do not say what they share)."""
        a = self.args
        if a.pairs == "groups":
            return sample_groups(self.data.factor_sizes, self.content_factors, a.batch_size, a.group_size,
                                 self.data_gen)
        k = None if a.k == "rnd" else a.k
        return sample_k_factor_pairs(self.data.factor_sizes, a.batch_size, k, a.pairs == "k_factors_exact",
                                     self.data_gen)[0], None

    def next_step(self):
        """One train_step() on a fresh batch -> its terms as a (n_terms,) tensor, in MODELS[model].terms order."""
        a = self.args
        classes, shares = self.sample()
        x = self.data.images(classes.flatten(0, 1)).view(*classes.shape[:2], self.data.channels, 64, 64)
        terms = train_step(self.vae, self.D, self.vae_opt, self.d_opt, x, shares, a.model, a.beta, a.gamma,
                           a.content_dims, a.tc_level, self.model_gen, amp=self.device.type == "cuda")
        return torch.stack([terms[name] for name in MODELS[a.model].terms])

    def state(self, log_sum, log_count, optimizers=None):
        """The run's checkpoint: tensors and plain types only, so that it loads with weights_only=True.
        optimizers: the (vae_opt, d_opt) state dicts, when a StackedRuns holds them."""
        vae_opt, d_opt = optimizers or (self.vae_opt.state_dict(), self.d_opt.state_dict() if self.d_opt else None)
        weights = lambda m: {n: t.detach().clone() for n, t in m.state_dict().items()}  # noqa: E731 (not views)
        return {"step": self.step, "train_seconds": self.train_seconds, "args": public_args(self.args),
                "vae": weights(self.vae), "vae_opt": vae_opt, "D": weights(self.D) if self.D is not None else None,
                "d_opt": d_opt, "data_gen": self.data_gen.get_state(), "model_gen": self.model_gen.get_state(),
                "log_sum": log_sum, "log_count": log_count, "torch_threads": self.threads,
                "machines": self.machines, "factor_sizes": list(self.data.factor_sizes)}

    def load(self, checkpoint, path):
        """A checkpoint (load_checkpoint()) into this run: weights, optimisers, generators, step."""
        c = checkpoint
        try:
            saved = c.get("factor_sizes")  # unknown for earlier checkpoints
            if saved is not None and tuple(saved) != self.data.factor_sizes:
                raise UserError(f"the checkpoint {path} was trained on data with factor sizes {tuple(saved)}, but "
                                f"{self.data.name} here has {self.data.factor_sizes}: a run goes on with the data it "
                                "started on; point --data-dir at that file (or train anew in another --out)")
            self.vae.load_state_dict(c["vae"])
            load_adam(self.vae_opt, c["vae_opt"])
            if self.D is not None:
                self.D.load_state_dict(c["D"])
                load_adam(self.d_opt, c["d_opt"])
            try:
                self.data_gen.set_state(c["data_gen"])
                self.model_gen.set_state(c["model_gen"])
            except RuntimeError:  # saved on another kind of device: its generator states do not fit these
                print(f"note: the checkpoint's generators belong to another device; continuing with generators "
                      f"seeded from --seed and step {c['step']}", file=sys.stderr)
                base = (self.args.seed * 1_000_003 + c["step"]) * 2 % 2 ** 63  # two roles, never one seed
                self.data_gen.manual_seed(base)
                self.model_gen.manual_seed(base + 1)
            self.step, self.train_seconds = int(c["step"]), float(c["train_seconds"])
            self.threads = [int(n) for n in c.get("torch_threads", [])]  # unknown for earlier checkpoints
            self.machines = [str(m) for m in c.get("machines", [])]
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as error:
            raise UserError(f"the checkpoint {path} does not fit the run its flags describe "
                            f"({type(error).__name__}: {(str(error).splitlines() or [''])[0]})") from None


def load_adam(opt, saved):
    """A saved Adam state into `opt`: the saved hyperparameters and moments, into memory of its own (not the
    memory-mapped checkpoint's), keeping this optimiser's implementation (fused, capturable: the device's)."""
    own = opt.param_groups[0]
    groups = [dict(g, **{k: own[k] for k in ("fused", "capturable", "foreach", "differentiable") if k in own})
              for g in saved["param_groups"]]
    state = {i: {name: v.clone() for name, v in s.items()} for i, s in saved["state"].items()}
    opt.load_state_dict({"state": state, "param_groups": groups})


class Bound:
    """A module computed with other parameters (torch.func.functional_call): Bound(vae, p).encode(x) runs
    VAE.encode with the weights p, so that one definition of the networks serves every run of a StackedRuns."""

    def __init__(self, module, params):
        self.module, self.params = module, params

    def __call__(self, *args):
        return torch.func.functional_call(self.module, self.params, args)

    def __getattr__(self, name):
        attr = getattr(self.module, name)
        if isinstance(attr, nn.Module):  # a submodule, with its share of the parameters
            prefix = name + "."
            return Bound(attr, {k[len(prefix):]: v for k, v in self.params.items() if k.startswith(prefix)})
        if callable(attr):  # a method (encode, decode), run on this Bound
            return functools.partial(getattr(type(self.module), name), self)
        return attr


class StackedRuns:
    """Accelerators: the S runs of a sweep as one computation, torch.func.vmap over their stacked weights (a few
    large kernels instead of S times a few hundred small ones). Each run's modules keep showing its weights (views
    of the stacked storage); one Adam updates the stacked tensors, which is each run's own Adam (Adam is
    elementwise). Each run draws what its train_step() would, from its own generators, and gets the gradient of its
    own loss: the tests check every member against the run alone."""

    def __init__(self, runs):
        self.runs, first = runs, runs[0]
        self.vae_params, self.vae_opt = self._stack("vae", "vae_opt")
        self.d_params, self.d_opt = self._stack("D", "d_opt") if first.D is not None else ({}, None)
        self.beta = torch.tensor([float(r.args.beta) for r in runs], device=first.device)
        self.gamma = torch.tensor([float(r.args.gamma) for r in runs], device=first.device)

    def _stack(self, net, opt):
        """The runs' weights of one network stacked (and the runs' modules turned into views of them), with one
        Adam over them holding the runs' Adam states stacked. The runs' own optimisers are dropped."""
        modules = [getattr(r, net) for r in self.runs]
        stacked = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in modules])
                   for n, _ in modules[0].named_parameters()}
        for k, m in enumerate(modules):
            for n, p in m.named_parameters():
                p.data = stacked[n][k]
        params = {n: t.requires_grad_() for n, t in stacked.items()}
        first = self.runs[0]
        stacked_opt = adam(params.values(), net, first.device, first.device.type == "cuda" and not first.args.eager)
        states = [getattr(r, opt).state_dict()["state"] for r in self.runs]
        if states[0]:  # resumed: each run's Adam moments, stacked (one step count: the runs stand at one step)
            stacked_opt.load_state_dict({"state": {i: {name: v if name == "step" else torch.stack(
                [s[i][name] for s in states]) for name, v in s0.items()} for i, s0 in states[0].items()},
                "param_groups": stacked_opt.state_dict()["param_groups"]})
        for r in self.runs:
            setattr(r, opt, None)  # the stacked Adam holds its state: optimizer_states(k)
        return params, stacked_opt

    def optimizer_states(self, k):
        """Run k's share of the stacked Adams, as the state dicts of an Adam over its own weights."""
        def share(opt):
            sd = opt.state_dict()
            return {"state": {i: {name: (v if name == "step" else v[k]).detach().clone() for name, v in s.items()}
                              for i, s in sd["state"].items()}, "param_groups": sd["param_groups"]}
        return share(self.vae_opt), share(self.d_opt) if self.d_opt is not None else None

    def next_step(self):
        """One step of every run -> (S, n_terms) tensor of their terms."""
        first, a = self.runs[0], self.runs[0].args
        B, G, L = a.batch_size, a.group_size, a.latent_dim
        classes, shares, eps, u = [], [], [], []
        for r in self.runs:  # each run's draws, in the order its train_step() draws them
            c, s = r.sample()
            classes.append(c)
            shares.append(s)
            eps.append(torch.randn((B, G, L), generator=r.model_gen, device=r.device))
            if first.D is not None:
                u.append(torch.rand((B * G, L), generator=r.model_gen, device=r.device))
        x = first.data.images(torch.cat(classes).flatten(0, 1)).view(len(self.runs), B, G, first.data.channels, 64, 64)
        autocast = functools.partial(torch.autocast, first.device.type, dtype=torch.bfloat16,
                                     enabled=first.device.type == "cuda", cache_enabled=False)
        vae, D = first.vae, first.D
        frozen_d = {n: p.detach() for n, p in self.d_params.items()}  # the VAE's step never moves D

        def vae_loss(vae_p, d_p, x, shares, eps, beta, gamma):
            with autocast():
                D_p = Bound(D, d_p) if D is not None else None
                loss, terms, z = group_objective(a.model, Bound(vae, vae_p), D_p, x, shares, beta, gamma,
                                                 a.content_dims, eps=eps)
            return loss, torch.stack(list(terms.values())), z

        shares = torch.stack(shares) if shares[0] is not None else torch.zeros(len(self.runs), B, dtype=torch.bool,
                                                                               device=first.device)  # unused
        loss, terms, z = torch.func.vmap(vae_loss)(self.vae_params, frozen_d, x, shares, torch.stack(eps), self.beta,
                                                   self.gamma)
        self.vae_opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # each run's weights get exactly the gradient of its own loss
        self.vae_opt.step()
        values = [loss.detach()[:, None], terms.detach()]
        if D is not None:
            blocks = tc_blocks(a.tc_level, L, a.content_dims)

            def d_loss(d_p, z, u):
                with autocast():
                    return discriminator_loss(Bound(D, d_p), z, permute_codes(z, blocks, u=u))

            d_losses, d_acc = torch.func.vmap(d_loss)(self.d_params, z.detach(), torch.stack(u))
            self.d_opt.zero_grad(set_to_none=True)
            d_losses.sum().backward()
            self.d_opt.step()
            values += [d_losses.detach()[:, None], d_acc.detach()[:, None]]
        return torch.cat([v.float() for v in values], 1)


class CudaGraphStep:
    """CUDA: a step function run eagerly for a few warm-up steps (on a side stream, as CUDA asks: lazy optimiser
    state, cuBLAS handles), then captured once as a CUDA graph and replayed: one launch instead of hundreds, the
    same computation. The generators are registered with the graph, so each replay draws fresh numbers."""

    WARMUP = 3

    def __init__(self, step, generators, device):
        self.step, self.generators, self.device = step, generators, device
        self.graph, self.warmed, self.failed = None, 0, False

    def __call__(self):
        if self.graph is not None:
            self.graph.replay()
            return self.values.clone()
        if self.failed:
            return self.step()
        if self.warmed < self.WARMUP:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                values = self.step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.warmed += 1
            return values
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)
        try:
            with torch.cuda.graph(graph):
                self.values = self.step()
        except RuntimeError as error:  # speed only: the eager step computes the same thing
            print(f"warning: CUDA graph capture failed ({error}); training continues without it", file=sys.stderr)
            self.failed = True
            return self.step()
        self.graph = graph
        graph.replay()  # capturing records the step without running it
        return self.values.clone()


class Sweep:
    """The runs one process trains together: S runs that share model, data set and shapes and differ in seed, beta
    and gamma (S = 1: an ordinary run). train_step() steps every run once: on the CPU each run's own train_step()
    in turn, on accelerators one StackedRuns computation; on CUDA either way is one captured CUDA graph."""

    BATCHED = None  # None: StackedRuns on accelerators when S > 1, the loop on the CPU; True / False: always

    def __init__(self, runs):
        self.runs, device = runs, runs[0].device
        batched = (device.type != "cpu" and len(runs) > 1) if self.BATCHED is None else self.BATCHED
        self.stacked = StackedRuns(runs) if batched else None
        self.graph = None
        if device.type == "cuda" and not runs[0].args.eager:
            generators = [g for r in runs for g in (r.data_gen, r.model_gen)]
            self.graph = CudaGraphStep(self._step, generators, device)

    def __len__(self):
        return len(self.runs)

    @property
    def step(self):
        return self.runs[0].step

    @property
    def batched(self):
        return self.stacked is not None

    def _step(self):
        if self.stacked is not None:
            return self.stacked.next_step()
        return torch.stack([r.next_step() for r in self.runs])

    def train_step(self):
        """One step of every run -> (S, n_terms) tensor of each run's terms (detached, on the device)."""
        values = self.graph() if self.graph is not None else self._step()
        for r in self.runs:
            r.step += 1
        return values

    def save(self, k, path, log_sum, log_count):
        """Run k's checkpoint, in the format of a run alone whatever trained it."""
        optimizers = self.stacked.optimizer_states(k) if self.stacked is not None else None
        state = self.runs[k].state(log_sum.clone(), log_count, optimizers)  # its own row, not a view of all S
        write_atomic(path, lambda tmp: torch.save(state, tmp))


# ----------------------------------------------------------------------------------------------------------------
# Run folders: errors, atomic writes, locks, checkpoints, configs read back, logs.
# ----------------------------------------------------------------------------------------------------------------
# Bad input is a UserError (one clear line from main(), never a traceback); every file is written whole or not at
# all; a run folder is held by one process at a time; checkpoints and configs are read back without running code.
class UserError(ValueError):
    """A problem with the command line's input (a flag, a data file): the message says what was wrong and what was
    expected."""

    exit_code = 2


class RunFolderBusy(UserError):
    """Another live process holds the run folder (run_paper.sh's workers skip such a run: exit status 3)."""

    exit_code = 3


def write_atomic(path, write):
    """write(tmp) then rename tmp onto path: a crash, a Ctrl-C or a full disk leaves the old file or the new one,
    never half of one, and no temporary file. An OSError goes on to main(), naming the file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            write(tmp)
        except RuntimeError as error:  # torch.save's failed write (a full disk, say) is not an OSError
            raise OSError(errno.EIO, f"could not write it ({str(error).splitlines()[0] if str(error) else error})",
                          str(path)) from None
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename in (None, str(tmp)):
            error.filename = str(path)
        raise


def write_text_atomic(path, text):
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def _disk_note(path):
    try:
        usage = shutil.disk_usage(Path(path).parent)
    except OSError:
        return ""
    return f" (the disk holding {Path(path).parent} has {usage.free / 2 ** 20:,.0f} MiB free)"


def check_out_folder(out):
    """--out must be a folder (or not exist yet) under folders: checked before any data or model is built."""
    out = Path(out)
    for p in (out, *out.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise UserError(f"--out {out}: {p} is a file, not a folder; choose another --out")
            return out
    return out


class RunFolderLock:
    """Holds a run folder for this process: an OS lock (flock) on RUN/.lock, which the OS drops when the process
    dies, however it dies. A second process gets a RunFolderBusy error naming the holder."""

    def __init__(self, out):
        self.out, self.fd = Path(out), None

    def __enter__(self):
        check_out_folder(self.out)
        self.made = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise UserError(f"--out {self.out}: cannot write there ({error.strerror or error}); "
                            "choose a folder you can write") from None
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(self.fd)
                raise RunFolderBusy(f"--out {self.out} is in use by {holder}; wait for it to finish, or choose "
                                    "another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        return self

    def __exit__(self, error_type, *exc):
        if error_type is not None and self.made and [p.name for p in self.out.iterdir()] == [".lock"]:
            shutil.rmtree(self.out, ignore_errors=True)  # refused before writing anything: leave nothing behind
        os.close(self.fd)  # closing the descriptor releases the lock; the file stays (removing it would race)


CHECKPOINT_KEYS = ("step", "train_seconds", "args", "vae", "vae_opt", "D", "d_opt", "data_gen", "model_gen",
                   "log_sum", "log_count")  # checkpoints of earlier versions also hold "torch_rng", unused now


def load_checkpoint(path):
    """A checkpoint holds tensors and plain types only; weights_only=True refuses anything else, so loading a file
    never runs code from it."""
    try:
        # On the CPU: generator states must stay CPU byte tensors; load_state_dict moves the rest to the device.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: read when used
    except Exception as error:
        raise UserError(f"could not read the checkpoint {path} ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing or not isinstance(checkpoint["args"], dict) or not isinstance(checkpoint["step"], int):
        raise UserError(f"{path} is not a grouptc checkpoint (missing or wrong: {', '.join(missing) or 'args, step'})")
    return checkpoint


def read_config(path):
    """A run folder's config.json: the flags that define its run."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"could not read {path} ({error}); it should be the config.json this program wrote") from None
    if not isinstance(saved, dict) or "model" not in saved:
        raise UserError(f"{path} is not a grouptc config.json (expected an object of flags)")
    return saved


def prepare_run(args):
    """Read what args.out already holds, for a run about to train there (its folder held by this process) -> its
    checkpoint (None: from step 0), or False when the run is finished: trained to its --steps and evaluated there.
    The folder's config.json defines its run: --resume continues it from its checkpoint, or restarts it from step 0
    when it died before its first checkpoint. A sweep's run must be the run its folder's name says."""
    out = Path(args.out)
    ckpt_path, config_path = out / "checkpoint.pt", out / "config.json"
    check_run_folder(out)
    checkpoint = load_checkpoint(ckpt_path) if args.resume and ckpt_path.exists() else None
    if not args.resume and is_run(out):
        raise UserError(f"--out {out} already holds a run; pass --resume to continue it, or choose another --out")
    for orphan in out.glob(".*.tmp"):  # left by a process killed while writing (this process holds the folder)
        orphan.unlink(missing_ok=True)
    if checkpoint is not None:
        merge_saved_args(args, checkpoint["args"], ckpt_path)  # the saved --device too, unless typed anew
        check_one_run(args, config_path, ckpt_path)
        if args.steps < checkpoint["step"]:
            raise UserError(f"--steps {args.steps} is below the {checkpoint['step']:,} steps the run in {out} has "
                            f"trained; give --steps {checkpoint['step']} or more (or leave it out)")
    elif args.resume and (out / "metrics.json").exists():  # a run's results without its checkpoint: an archive
        if config_path.exists():
            merge_saved_args(args, read_config(config_path), config_path)
            if evaluated_at(out) == args.steps:
                print(f"{out} is finished ({args.steps:,} steps, evaluated); its checkpoint.pt is not there, so "
                      "nothing is left to do (--eval-only needs the checkpoint too)", file=sys.stderr)
                return False
        raise UserError(f"--resume: {out} holds a run's results (metrics.json) but no checkpoint.pt to continue it "
                        f"from{f' to {args.steps:,} steps' if config_path.exists() else ''}; put its checkpoint "
                        "back, or train it anew in another --out (here it would overwrite them)")
    elif args.resume and config_path.exists():
        merge_saved_args(args, read_config(config_path), config_path)
        print(f"{out} has no checkpoint (its run stopped before the first one): restarting the run its config.json "
              "defines from step 0", file=sys.stderr)
    else:
        check_args(args)  # nothing saved: the typed flags alone define the run
    if getattr(args, "parent", None) is not None and run_name(args) != out.name:
        raise UserError(f"{out} holds the run {run_name(args)}, not the one its name says; a run's folder in a "
                        f"sweep is named by its settings: move it out of the way (or rename it {run_name(args)})")
    if checkpoint is not None and args.steps == checkpoint["step"] and evaluated_at(out) == args.steps:
        print(f"{out} is finished ({args.steps:,} steps, evaluated); nothing to do. --eval-only evaluates it again",
              file=sys.stderr)
        return False
    return checkpoint


def check_one_run(args, config_path, ckpt_path):
    """The folder's config.json (if any) and its checkpoint, whose flags are now in args, describe one run."""
    if config_path.exists():
        saved = argparse.Namespace(**(DEFAULTS | vars(read_flags(read_config(config_path), config_path))))
        if run_name(saved) != run_name(args):  # the name holds every run-defining flag, exactly
            raise UserError(f"{config_path} and {ckpt_path} describe different runs; one of them was put there from "
                            "another run: move the folder out of the way")


def check_run_folder(out):
    """A run's folder is a folder of its own: it holds no runs below it and is inside no run."""
    if below := runs_below(out):
        raise UserError(f"--out {out} holds runs in folders below it ({below[0]}, ...); a run needs a "
                        "folder of its own: choose another --out (or --resume it without --model to continue the "
                        "runs there)")
    if run_above(out) is not None:
        raise UserError(f"--out {out} is inside the run folder {run_above(out)}; choose a folder outside it")


def evaluated_at(out):
    """The step at which the run in `out` was last evaluated (its metrics.json), or None."""
    try:
        return json.loads((Path(out) / "metrics.json").read_text())["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def merge_saved_args(args, saved, path):
    """A resumed or re-evaluated run keeps its saved flags; a run-defining flag typed anew must agree. The saved
    flags are read by the parser that reads typed ones, and the merged flags pass the same checks."""
    flags = vars(read_flags(saved, path))
    if not device_available(flags.get("device", "auto")):  # a CUDA run continued where there is none, say
        if "device" not in args.given:
            print(f"{path.parent} was run with --device {flags['device']}, which this machine lacks: using --device "
                  "auto", file=sys.stderr)
        flags["device"] = DEFAULTS["device"]
    for key, value in flags.items():
        if key in args.given and key in RUN_DEFINING and not _same_flag(key, getattr(args, key), value, saved):
            raise UserError(f"--{key.replace('_', '-')} {getattr(args, key)} differs from the run in {path.parent} "
                            f"({value}); leave it out to keep the saved value, or use another --out")
        if key not in args.given:
            setattr(args, key, value)
    try:
        check_args(args)
    except UserError as error:
        try:  # whose flag is refused: one typed now (its message names it), or a saved one?
            check_args(argparse.Namespace(**(vars(args) | flags)))
        except UserError:
            raise UserError(f"{path} holds a flag this program refuses: {error}") from None
        raise


def _same_flag(key, typed, saved_value, saved):
    """Whether a flag typed anew says what the saved one says (the default content factors, typed out, do)."""
    if key == "k" and saved.get("pairs", "groups") == "groups":
        return True  # --k means nothing on the paper's group pairs
    if key == "content_factors":
        return content_names(saved | {"content_factors": typed}) == content_names(saved | {"content_factors":
                                                                                            saved_value})
    return typed == saved_value


def public_args(args):
    return {k: v for k, v in vars(args).items() if k not in ("given", "sweep", "parent", "discovered")}


class CsvLog:
    """A CSV file with a row per step, resumed at a checkpoint's step: the rows after it are dropped (and so is a
    row that a crash cut short), so that a resumed run's file equals an uninterrupted run's."""

    def __init__(self, path, columns, step):
        self.path = Path(path)
        rows = read_log(path) if self.path.exists() and step > 0 else []
        rows = [r for r in rows if whole_row(r, columns) and int(r["step"]) <= step]

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(columns)
                writer.writerows([[r[c] for c in columns] for r in rows])
        write_atomic(self.path, write)

    def row(self, values):
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(values)


class RunLog:
    """A run's log.csv (the mean of each term every --log-every steps), its scores.csv (the scores every
    --eval-every steps, if asked) and, in a sweep, its own copy of the progress lines (train.log), since the
    terminal shows the sweep's."""

    def __init__(self, args, names, step, sweep):
        self.out, self.sweep = Path(args.out), sweep
        self.terms = CsvLog(self.out / "log.csv", ["step", *names, "ms_per_step"], step)
        if sweep and step > 0 and (self.out / "train.log").exists():  # a resume: the lines after its step go
            lines = (self.out / "train.log").read_text().splitlines()
            kept = [line for line in lines if not (s := re.match(r"step\s+(\d+)/", line)) or int(s[1]) <= step]
            write_text_atomic(self.out / "train.log", "\n".join(kept + [f"resumed at step {step:,}"]) + "\n")
        self.scores = CsvLog(self.out / "scores.csv", ["step", *PAPER_METRICS], step) if args.eval_every else None

    def row(self, step, means, ms):
        self.terms.row([step, *[f"{v:.6g}" for v in means], f"{ms:.2f}"])

    def scores_row(self, step, scores):
        self.scores.row([step, *[f"{scores[k]:.6g}" for k in PAPER_METRICS]])

    def say(self, line):
        if self.sweep:
            with open(self.out / "train.log", "a") as f:
                f.write(line + "\n")


def whole_row(row, columns=None):
    """Whether a log row is whole: a step, then a number in every column (a row cut by a crash is not)."""
    try:
        [float(row[c]) for c in (columns or row) if c != "step"]  # noqa: B018 (numbers, or an error)
        return str(row.get("step")).isdigit() and None not in row
    except (KeyError, TypeError, ValueError):
        return False


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class StopRequest:
    """Ctrl-C / SIGTERM: the first asks the loop to checkpoint after the current step; another, a second or more
    later, stops at once. (One stop can arrive twice within milliseconds: a batch system's cancel signals both the
    process and the script that runs it, and run_paper.sh passes its stop on to its runs.)"""

    def __init__(self):
        self.requested, self.at = False, 0.0

    def __call__(self, signum, frame):
        if self.requested:
            if time.monotonic() - self.at > 1.0:
                raise KeyboardInterrupt
            return  # the same stop, twice
        self.requested, self.at = True, time.monotonic()
        print("\ninterrupt: finishing this step and writing a checkpoint (again, a second or more later, to stop at "
              "once)", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# Data sources: the official files (downloaded if missing) and the built-in renderers, factor classes -> images.
# ----------------------------------------------------------------------------------------------------------------
# A class tuple is flattened to the row of a data set by a mixed-radix index (last factor fastest), as both
# official files do.
DSPRITES_FACTORS = ("shape", "scale", "orientation", "posX", "posY")
DSPRITES_SIZES = (3, 6, 40, 32, 32)
# NOTE: the paper names its content split only for 3D Shapes (Sec. 4.1). For dSprites it gives none; this project
# takes what the sprite is (shape, scale, orientation) as content and where it is (posX, posY) as the rest, the
# split that mirrors 3D Shapes' object vs scene and gives both groups at least two factors.
DSPRITES_CONTENT = ("shape", "scale", "orientation")  # this project's choice; non-content: posX, posY
SHAPES3D_FACTORS = ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
SHAPES3D_SIZES = (10, 10, 10, 8, 4, 15)
SHAPES3D_CONTENT = ("object_hue", "scale", "shape")  # the paper's Sec. 4.1; non-content: floor, wall, orientation

DEFAULT_CONTENT = {"dsprites": DSPRITES_CONTENT, "dsprites_procedural": DSPRITES_CONTENT,
                   "shapes3d": SHAPES3D_CONTENT, "shapes3d_procedural": SHAPES3D_CONTENT}
DATASET_FACTORS = {"dsprites": DSPRITES_FACTORS, "dsprites_procedural": DSPRITES_FACTORS,
                   "shapes3d": SHAPES3D_FACTORS, "shapes3d_procedural": SHAPES3D_FACTORS}
DATASET_SIZES = {"dsprites": DSPRITES_SIZES, "dsprites_procedural": DSPRITES_SIZES,
                 "shapes3d": SHAPES3D_SIZES, "shapes3d_procedural": SHAPES3D_SIZES}
MIN_EVAL_SAMPLES = 100  # fewer points than this in 20 bins make the plug-in MI mostly noise
MAX_SEED = 2 ** 62  # the generators' seeds are derived from it and must stay within torch's 64 bits

DSPRITES_NPZ = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
DSPRITES_HDF5 = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.hdf5"
DOWNLOADS = {  # file name -> (address, hash algorithm, published digest)
    DSPRITES_NPZ: ("https://github.com/deepmind/dsprites-dataset/raw/master/" + DSPRITES_NPZ,
                   "md5", "7da33b31b13a06f4b04a70402ce90c2e"),
    DSPRITES_HDF5: ("https://github.com/deepmind/dsprites-dataset/raw/master/" + DSPRITES_HDF5,
                    "sha256", "729fa22e884c9c500e1f17415d580746b4c5894fbbb780a1319bbcfa39a745bb"),
    "3dshapes.h5": ("https://storage.googleapis.com/3d-shapes/3dshapes.h5",
                    "sha256", "0a0f6ed98baff276a50f3a081a7434d788da63cb135a98189b2a5b5769be1785"),
}


def index_bases(factor_sizes):
    """Mixed-radix bases: flat = classes @ bases. dSprites (3,6,40,32,32) -> (245760, 40960, 1024, 32, 1)."""
    bases = np.ones(len(factor_sizes), dtype=np.int64)
    for k in range(len(factor_sizes) - 2, -1, -1):
        bases[k] = bases[k + 1] * factor_sizes[k + 1]
    return bases


def classes_to_index(classes, factor_sizes):
    """(..., K) integer classes -> (...) flat row index of the data set."""
    bases = device_constant(tuple(index_bases(factor_sizes).tolist()), classes.device)
    return (classes * bases).sum(-1)


def index_to_classes(index, factor_sizes):
    """(...) flat row index -> (..., K) integer classes; the inverse of classes_to_index."""
    bases = torch.as_tensor(index_bases(factor_sizes), device=index.device)
    sizes = torch.as_tensor(factor_sizes, device=index.device)
    return (index.unsqueeze(-1) // bases) % sizes


class GroupedData:
    """What every data source offers: factor names and sizes, the default content factors, and images(classes)."""

    name = "base"
    factor_names = ()
    factor_sizes = ()
    content_factors = ()  # default content group, by name
    channels = 1

    def __init__(self, device="cpu"):
        self.device = torch.device(device)

    @property
    def num_points(self):
        return int(np.prod(self.factor_sizes))

    def images(self, classes):
        """(B, K) LongTensor of factor classes -> (B, C, 64, 64) float tensor in [0, 1] on self.device."""
        raise NotImplementedError


class ArrayData(GroupedData):
    """A data set held whole as uint8 (B, 64, 64) or (B, 64, 64, 3), gathered per batch by flat index."""

    def __init__(self, array, factor_names, factor_sizes, content_factors, name, device="cpu"):
        super().__init__(device)
        self.name, self.factor_names, self.factor_sizes = name, tuple(factor_names), tuple(int(s) for s in factor_sizes)
        self.content_factors = tuple(content_factors)
        self.array = torch.from_numpy(array).to(self.device)  # uint8; never the whole array as float
        self.channels = 1 if array.ndim == 3 else array.shape[3]
        self.scale = 1.0 if self.channels == 1 else 1.0 / 255.0  # dSprites stores {0, 1}, 3D Shapes 0..255

    def images(self, classes):
        rows = self.array[classes_to_index(classes.to(self.device), self.factor_sizes)]
        x = rows.unsqueeze(1) if self.channels == 1 else rows.permute(0, 3, 1, 2)
        return x.float().mul_(self.scale)


def _progress(label, done, total):
    if sys.stderr.isatty() or done >= total:
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r{label}: {done / max(total, 1):6.1%} ({done:,}/{total:,}){end}")
        sys.stderr.flush()


def _file_digest(path, algorithm):
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def download(file_name, data_dir, alternative):
    """Fetch an official file into data_dir: to a temporary name, checked against its published digest, then
    renamed into place. Any failure is a UserError that says where to put the file by hand."""
    url, algorithm, expected = DOWNLOADS[file_name]
    target = Path(data_dir) / file_name
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")  # this process's own: only it is removed
    help_text = (f"Download {url} yourself and put it at {target}, or use the built-in renderer "
                 f"'--dataset {alternative}' (no download needed).")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"{file_name} not found in {data_dir}/; downloading {url}", file=sys.stderr)
        with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as out:
            total, done = int(response.headers.get("Content-Length") or 0), 0
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                done += len(block)
                _progress(f"downloading {file_name}", done, total or done + 1)
        _progress(f"downloading {file_name}", 1, 1)
    except (OSError, ValueError) as error:
        partial.unlink(missing_ok=True)
        raise UserError(f"could not download {file_name} from {url} ({error}). {help_text}") from None
    actual = _file_digest(partial, algorithm)
    if actual != expected:
        partial.unlink(missing_ok=True)
        raise UserError(f"the download of {file_name} from {url} has {algorithm} {actual}, expected {expected}; "
                        f"nothing was kept. {help_text}")
    os.replace(partial, target)
    return target


def _check(condition, path, what):
    if not condition:
        raise UserError(f"{path} is not in the official layout: {what}")


def _read_dsprites(path):
    """Read imgs (N, 64, 64) uint8 and the (N, 6) classes from the official npz or hdf5; check the structure."""
    try:
        if path.suffix == ".npz":
            with np.load(path) as f:  # no allow_pickle: imgs and latents_classes do not need it
                _check("imgs" in f.files and "latents_classes" in f.files, path,
                       f"expected keys 'imgs' and 'latents_classes', found {sorted(f.files)}")
                imgs, classes = f["imgs"], f["latents_classes"]  # each npz access decompresses again: read once
        else:
            import h5py
            with h5py.File(path, "r") as f:
                _check("imgs" in f and "latents/classes" in f, path,
                       f"expected datasets 'imgs' and 'latents/classes', found {sorted(f.keys())}")
                imgs = f["imgs"][()]  # its chunking makes single-image reads slow: read it whole
                classes = f["latents/classes"][()]
    except UserError:
        raise
    except Exception as error:  # a truncated zip, a broken HDF5 file, ...
        raise UserError(f"could not read {path} as a dSprites file ({type(error).__name__}: {error}). "
                        "Replace it with the official file, or use '--dataset dsprites_procedural'.") from None
    _check(imgs.dtype == np.uint8 and imgs.ndim == 3 and imgs.shape[1:] == (64, 64), path,
           f"'imgs' should be uint8 (N, 64, 64), got {imgs.dtype} {imgs.shape}")
    _check(classes.ndim == 2 and classes.shape == (len(imgs), 6) and np.issubdtype(classes.dtype, np.integer),
           path, f"latent classes should be integer (N, 6) with N = {len(imgs)}, got {classes.dtype} {classes.shape}")
    return imgs, classes


def _sizes_from_layout(classes, path):
    """Factor sizes implied by a (N, K) class table, checked against the mixed-radix layout (row i = index i)."""
    _check(len(classes) > 0 and classes.min() >= 0, path, "factor classes must be non-negative")
    sizes = tuple(int(s) for s in classes.max(0) + 1)
    _check(int(np.prod(sizes)) == len(classes), path, f"{len(classes)} rows but factor sizes {sizes}")
    _check(np.array_equal(classes @ index_bases(sizes), np.arange(len(classes))), path,
           "rows are not ordered by factor classes (last factor fastest)")
    return sizes


def _check_data_dir(data_dir):
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is a file; give the folder that holds (or will hold) the data files")
    return data_dir


def _check_official_sizes(sizes, official, path, allow_subgrid):
    if tuple(sizes) != tuple(official) and not allow_subgrid:
        raise UserError(f"{path} has factor sizes {tuple(sizes)}, the official file {tuple(official)}: it is not the "
                        "data set. Use the official file, or pass --allow-subgrid to train on a smaller file in the "
                        "official layout (a test file, say)")


def load_dsprites(data_dir, device, allow_subgrid=False):
    data_dir = _check_data_dir(data_dir)
    path = next((data_dir / n for n in (DSPRITES_NPZ, DSPRITES_HDF5) if (data_dir / n).exists()), None)
    if path is None:
        path = download(DSPRITES_NPZ, data_dir, "dsprites_procedural")
    t0 = time.perf_counter()
    imgs, classes = _read_dsprites(path)
    sizes = _sizes_from_layout(classes, path)
    _check(sizes[0] == 1, path, f"the first factor (color) should have one value, has {sizes[0]}")
    _check_official_sizes(sizes[1:], DSPRITES_SIZES, path, allow_subgrid)
    top = int(imgs.max())
    _check(top <= 1, path, f"dSprites pixels are 0 or 1, found values up to {top} (a 0/255 file?)")
    print(f"loaded {path} ({len(imgs):,} images) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return ArrayData(imgs, DSPRITES_FACTORS, sizes[1:], DSPRITES_CONTENT, "dsprites", device)  # color dropped


def load_shapes3d(data_dir, device, chunk=10_000, allow_subgrid=False):
    import h5py
    path = _check_data_dir(data_dir) / "3dshapes.h5"
    if not path.exists():
        path = download("3dshapes.h5", data_dir, "shapes3d_procedural")
    t0 = time.perf_counter()
    try:
        with h5py.File(path, "r") as f:
            _check("images" in f and "labels" in f, path,
                   f"expected datasets 'images' and 'labels', found {sorted(f.keys())}")
            images, labels = f["images"], f["labels"][()]
            n = len(images)
            _check(images.dtype == np.uint8 and images.shape[1:] == (64, 64, 3), path,
                   f"'images' should be uint8 (N, 64, 64, 3), got {images.dtype} {images.shape}")
            _check(labels.shape == (n, 6), path, f"'labels' should be (N, 6) with N = {n}, got {labels.shape}")
            # Labels are float factor VALUES; the class of a value is its rank among that factor's values.
            classes = np.stack([np.unique(labels[:, k], return_inverse=True)[1].reshape(-1) for k in range(6)], 1)
            sizes = _sizes_from_layout(classes, path)
            _check_official_sizes(sizes, SHAPES3D_SIZES, path, allow_subgrid)
            array = np.empty(images.shape, np.uint8)  # 5.5 GiB for the real file, filled in chunks
            for start in range(0, n, chunk):
                images.read_direct(array, np.s_[start:start + chunk], np.s_[start:start + chunk])
                _progress(f"reading {path.name}", min(start + chunk, n), n)
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"could not read {path} as a 3D Shapes file ({type(error).__name__}: {error}). "
                        "Replace it with the official file, or use '--dataset shapes3d_procedural'.") from None
    print(f"loaded {path} ({n:,} images) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return ArrayData(array, SHAPES3D_FACTORS, sizes, SHAPES3D_CONTENT, "shapes3d", device)


class ProceduralData(GroupedData):
    """A renderer: images drawn from their factor classes on the device, a few hundred at a time (large batches
    of full-size intermediate images spill out of the CPU's caches)."""

    chunk = 512

    def images(self, classes):
        classes = classes.to(self.device)
        if len(classes) <= self.chunk:
            return self.render(classes)
        return torch.cat([self.render(c) for c in classes.split(self.chunk)])

    def render(self, classes):
        raise NotImplementedError


class DSpritesProcedural(ProceduralData):
    """dSprites-like images on the official dSprites factor grid, drawn per batch from the geometry measured on the
    real frames (binary pixels, on when the pixel centre is inside the shape). A faithful stand-in, not dSprites:
    mean IoU against real frames about 0.9995 (square), 0.997 (ellipse), 0.96 (heart)."""

    name = "dsprites_procedural"
    factor_names, factor_sizes, content_factors = DSPRITES_FACTORS, DSPRITES_SIZES, DSPRITES_CONTENT
    channels = 1
    # Heart: two discs of radius 5 and a convex pentagon, in sprite units (v points down, lobes up).
    HEART_DISCS = ((-4.7, -4.1), (4.7, -4.1))
    HEART_POLYGON = ((-4.7, -4.1), (4.7, -4.1), (8.452, -0.795), (0.0, 8.8), (-8.452, -0.795))

    def __init__(self, device="cpu"):
        super().__init__(device)
        d = self.device
        self.scales = torch.linspace(0.5, 1.0, 6, device=d)
        self.angles = torch.linspace(0.0, 2 * math.pi, 40, device=d)
        self.positions = torch.linspace(0.0, 1.0, 32, device=d)
        self.window = torch.arange(32, device=d)  # a sprite (at most 13.6 px from its centre) fills <= 28 x 28 px
        self.polygon = torch.tensor(self.HEART_POLYGON, device=d)

    def render(self, classes):
        c = classes
        B = len(c)
        shape, s = c[:, 0, None, None], self.scales[c[:, 1]][:, None, None]
        theta = self.angles[c[:, 2]][:, None, None]
        cx = 16 + 32 * self.positions[c[:, 3]][:, None, None]  # posX moves along columns
        cy = 16 + 32 * self.positions[c[:, 4]][:, None, None]  # posY along rows, row 0 at the top
        # Only the 32 x 32 pixels around the centre are drawn (the rest stay off): a quarter of the work.
        col = (cx - 16).round().long() + self.window[None, None, :]  # (B, 1, 32): 15 px or more either side
        row = (cy - 16).round().long() + self.window[None, :, None]  # (B, 32, 1)
        dx, dy = (col + 0.5) - cx, (row + 0.5) - cy  # from the pixel centres, (B, 1, 32) and (B, 32, 1)
        cos, sin = torch.cos(theta), torch.sin(theta)
        u, v = (cos * dx - sin * dy) / s, (sin * dx + cos * dy) / s  # sprite coordinates
        square = (u.abs() <= 9.6) & (v.abs() <= 9.6)
        ellipse = (u / 12.75) ** 2 + (v / 7.25) ** 2 <= 1
        heart = torch.zeros_like(square)
        for ux, vy in self.HEART_DISCS:
            heart |= (u - ux) ** 2 + (v - vy) ** 2 <= 25.0
        inside = torch.ones_like(square)
        p, q = self.polygon, self.polygon.roll(-1, 0)
        for k in range(len(p)):  # counter-clockwise in (u, v): inside is left of every edge
            inside &= (q[k, 0] - p[k, 0]) * (v - p[k, 1]) - (q[k, 1] - p[k, 1]) * (u - p[k, 0]) >= 0
        heart |= inside
        on = torch.where(shape == 0, square, torch.where(shape == 1, ellipse, heart))
        image = torch.zeros(B, 64 * 64, device=self.device, dtype=torch.float32)
        pixels = (row * 64 + col).reshape(B, 32 * 32)  # (B, 32, 32) flat indices into the frame
        return image.scatter_(1, pixels, on.reshape(B, 32 * 32).float()).view(B, 1, 64, 64)


def _hue_to_rgb(h):
    """(...) hue in [0, 1) -> (..., 3) RGB of HSV(h, 1, 1)."""
    k = device_constant((3.0, 2.0, 4.0), h.device, torch.float32)
    rgb = (6 * h.unsqueeze(-1) - k).abs()
    return torch.stack([rgb[..., 0] - 1, 2 - rgb[..., 1], 2 - rgb[..., 2]], -1).clamp(0, 1)


class Shapes3DProcedural(ProceduralData):
    """A 3DShapes-like scene on the official 3D Shapes grid, drawn per batch: sky, a wall in HSV(wall_hue), a floor
    in HSV(floor_hue), an object in HSV(object_hue) with shading and a drop shadow. Object scale sets its width
    (18 * scale px), shape is one of cube (two faces once turned), cylinder (elliptic top), sphere, capsule (twice
    as tall), and the azimuth moves the room corner, the floor's shading, the cube's edge and the shadow. A stand-in
    whose factors each change the image in their own way, not the data set."""

    name = "shapes3d_procedural"
    factor_names, factor_sizes, content_factors = SHAPES3D_FACTORS, SHAPES3D_SIZES, SHAPES3D_CONTENT
    channels = 3
    SKY = (153 / 255, 226 / 255, 249 / 255)

    def __init__(self, device="cpu"):
        super().__init__(device)
        d = self.device
        self.hues = torch.linspace(0.0, 0.9, 10, device=d)
        self.scales = torch.linspace(0.75, 1.25, 8, device=d)
        self.azimuths = torch.linspace(-30.0, 30.0, 15, device=d) / 30.0  # in [-1, 1]
        rows = torch.arange(64, device=d, dtype=torch.float32) + 0.5
        self.y, self.x = torch.meshgrid(rows, rows, indexing="ij")
        self.sky = torch.tensor(self.SKY, device=d)

    def render(self, classes):
        c = classes
        B = len(c)
        floor_rgb, wall_rgb, object_rgb = (_hue_to_rgb(self.hues[c[:, k]])[:, None, None] for k in range(3))
        s, shape, a = self.scales[c[:, 3]][:, None, None], c[:, 4], self.azimuths[c[:, 5]][:, None, None]
        x, y = self.x, self.y  # (64, 64) pixel centres; against (B, 1, 1) factors -> (B, 64, 64)
        img = self.sky.expand(B, 64, 64, 3)
        # Wall, rows 17..40: the room corner sits 28|a| px from the edge the camera turned towards; the wall
        # beyond it is darker.
        beyond = torch.where(a >= 0, x > 64 - 28 * a, x < -28 * a) & (a != 0)
        wall = wall_rgb * torch.where(beyond, 0.75, 1.0)[..., None]
        img = torch.where(((y >= 17) & (y < 41))[..., None], wall, img)
        # Floor, rows 41..63: darker towards one side, the gradient turning with the azimuth.
        floor = floor_rgb * (0.8 + 0.2 * (x / 64 * (1 - 0.5 * a) + 0.25 * a).clamp(0, 1))[..., None]
        img = torch.where((y >= 41)[..., None], floor, img)
        # Drop shadow: a dark ellipse on the floor, shifted with the azimuth.
        w, base, dx = 9 * s, 53.0, x - 32  # w: half the object's width (18 * scale px)
        shadow = ((dx - 3 - 6 * a) / (1.3 * w)) ** 2 + ((y - 54) / 2.5) ** 2 <= 1
        img = torch.where(shadow[..., None], 0.35 * img, img)
        # The object, centred at column 32 on the floor (base row 53), one (mask, shading) per shape.
        box = (dx.abs() <= w) & (y <= base) & (y >= base - 2 * w)
        cube = (box, torch.where((dx > 0.8 * w * a) & (a != 0), 0.78, 1.0))  # two faces once turned
        top = (dx / w) ** 2 + ((y - base + 2 * w) / (0.35 * w)) ** 2 <= 1
        cylinder = (box | top, torch.where(top & ~box, 1.1, 0.75 + 0.25 * (1 - (dx / w).abs()).clamp(0, 1)))
        sphere = (dx ** 2 + (y - base + w) ** 2 <= w ** 2,
                  1 - 0.45 * (((dx + 0.4 * w) ** 2 + (y - base + 1.4 * w) ** 2).sqrt() / (2 * w)).clamp(0, 1))
        capsule = (((dx.abs() <= w) & (y <= base - w) & (y >= base - 3 * w))  # twice as tall as wide
                   | (dx ** 2 + (y - base + w) ** 2 <= w ** 2) | (dx ** 2 + (y - base + 3 * w) ** 2 <= w ** 2),
                   0.7 + 0.3 * (1 - (dx / w).abs()).clamp(0, 1))
        pick = torch.arange(B, device=self.device)
        mask = torch.stack([m.expand(B, 64, 64) for m, _ in (cube, cylinder, sphere, capsule)])[shape, pick]
        shade = torch.stack([t.expand(B, 64, 64) for _, t in (cube, cylinder, sphere, capsule)])[shape, pick]
        img = torch.where(mask[..., None], (object_rgb * shade[..., None]).clamp(0, 1), img)
        return img.permute(0, 3, 1, 2).contiguous()  # (B, 3, 64, 64)


def load_dataset(name, data_dir="data", device="cpu", allow_subgrid=False):
    """The data set called `name` (one of DATASETS) on `device`. An official file must hold the official factor
    grid unless allow_subgrid (a smaller file in the official layout, as the tests write)."""
    if name == "dsprites":
        return load_dsprites(data_dir, device, allow_subgrid)
    if name == "shapes3d":
        return load_shapes3d(data_dir, device, allow_subgrid=allow_subgrid)
    if name == "dsprites_procedural":
        return DSpritesProcedural(device)
    if name == "shapes3d_procedural":
        return Shapes3DProcedural(device)
    raise UserError(f"unknown data set '{name}'; expected one of {', '.join(DATASETS)}")


def resolve_factors(factors, factor_names):
    """Factor names (a comma-separated string or a sequence of names or indices) -> sorted tuple of indices."""
    if isinstance(factors, str):
        factors = [f.strip() for f in factors.split(",") if f.strip()]
    indices = []
    for f in factors:
        if isinstance(f, (int, np.integer)) and 0 <= f < len(factor_names):
            indices.append(int(f))
        elif f in factor_names:
            indices.append(factor_names.index(f))
        else:
            raise UserError(f"--content-factors: unknown factor '{f}'; expected names from {', '.join(factor_names)}")
    indices = tuple(sorted(set(indices)))
    if not indices or len(indices) == len(factor_names):
        raise UserError(f"--content-factors: both groups must be non-empty; got {list(factors)} out of "
                        f"{', '.join(factor_names)}")
    return indices


# ----------------------------------------------------------------------------------------------------------------
# Arguments: every hyperparameter in one place, with its meaning and paper default.
# ----------------------------------------------------------------------------------------------------------------
# --seed, --beta and --gamma take lists; expand() turns a command line into its runs (a run alone: a list of one).
# The flags that define what a run is; a resumed or re-evaluated run keeps them from its checkpoint.
RUN_DEFINING = ("model", "dataset", "batch_size", "group_size", "beta", "gamma", "tc_level", "content_factors",
                "latent_dim", "content_dims", "seed", "pairs", "k")
LIST_FLAGS = ("seed", "beta", "gamma")  # a list of values makes a sweep


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' only where X says something (not for None and switches)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:  # not `in (None, False)`: 0 == False
            return action.help
        return super()._get_help_string(action)


def build_parser(suppress_defaults=False, on_error=None):
    p = argparse.ArgumentParser(
        prog="grouptc.py", description="group-tcVAE, MLVAE, GVAE, Ada-GVAE and Ada-ML-VAE on paired observations; "
        "MIG and group-MIG.",
        formatter_class=_HelpFormatter)
    if on_error is not None:
        p.error = on_error

    def a(*flags, **kw):
        if suppress_defaults:  # for telling which flags the user typed
            kw["default"] = argparse.SUPPRESS
        p.add_argument(*flags, **kw)

    a("--model", choices=tuple(MODELS), default="group_tcvae",
      help="objective: group-tcVAE Eq. (3), MLVAE or GVAE Eq. (1), or Locatello et al. 2020's Ada-GVAE or "
           "Ada-ML-VAE (Eq. 1 on the dims each pair's KL says it shares)")
    a("--dataset", choices=DATASETS, default="dsprites",
      help="dsprites / shapes3d: the official files in --data-dir (downloaded if missing). dsprites_procedural / "
           "shapes3d_procedural: built-in dSprites-like / 3DShapes-like renderers on the official factor grids, no "
           "download; faithful stand-ins, NOT the data sets")
    a("--data-dir", default="data", help="folder of the official data files")
    a("--allow-subgrid", action="store_true", default=False,
      help="accept a dsprites / shapes3d file in the official layout whose factor grid is smaller than the official "
           "one (a test file); without it such a file is refused")
    a("--steps", type=int, default=300_000,
      help="training steps (one batch of groups each); 300,000 as disentanglement_lib / Locatello et al. 2020")
    a("--batch-size", type=int, default=32, help="groups per step (paper: 32 pairs = 64 images)")
    a("--pairs", choices=PAIRS, default="groups",
      help="what the observations of a group share. groups: every factor of the content group or of the others "
           "(the paper's; the model is told which). k_factors: Locatello et al. 2020's pairs as disentanglement_lib "
           "draws them (1 or --k factors resampled, each possibly to its old value); k_factors_exact: exactly --k "
           "factors changed, as that paper's text says. The k-factor pairs only for ada_gvae and ada_mlvae, which "
           "infer what a pair shares")
    a("--k", type=_k_value, default="rnd",
      help="k-factor pairs: the number of factors resampled, 1 .. (number of factors - 1), or rnd (drawn per pair)")
    a("--group-size", type=int, default=2, help="observations per group (paper: pairs)")
    a("--beta", type=_values(float), default=None,
      help="group-tcVAE: weight of TC(z_c, z_\\c), paper grid {10,20,30,40,50,100}, default 10; the others: weight "
           "of the KL, Locatello's grid {1,2,4,6,8,16}, default 1. A comma-separated list makes a sweep (see --out)")
    a("--gamma", type=_values(float), default=None,
      help="group-tcVAE: weight of the KL between the members' shared-group posteriors ('lambda' in the paper's "
           "grid {1,8,16,32,64}), default 8; unused by the others. A comma-separated list makes a sweep")
    a("--tc-level", choices=TC_LEVELS, default="inter",
      help="factorisation of q-bar (Sec. 3): inter: q(z_c)q(z_\\c), the paper's objective; inter_intra: q(z_c) "
           "prod_i q(z_\\c,i); full: prod_i q(z_i) (FactorVAE). Recommended for MIG and group-MIG: inter; in the "
           "README's 30,000-step CPU study it is ahead of MLVAE and GVAE on MIG on every seed and on group-MIG on "
           "the mean; full, ahead on MIG at 3,000 steps, is no better on MIG at 30,000 and behind on group-MIG")
    a("--content-factors", default=None,
      help="comma-separated factor names of the content group c (default: shapes3d object_hue,scale,shape, the "
           "paper's Sec. 4.1; dsprites shape,scale,orientation, this project's choice: the paper names no dSprites "
           "split)")
    a("--latent-dim", type=int, default=10, help="latent dims L")
    a("--content-dims", type=int, default=5, help="dims of z_c: the last ones of z (z_\\c are the first L - this)")
    a("--seed", type=_values(int), default=0,
      help="seed of the data generator and of the model (init, noise, permutations). A comma-separated list makes a "
           "sweep")
    a("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")
    a("--compile", action="store_true", default=False, help="torch.compile the networks")
    a("--eager", action="store_true", default=False,
      help="on CUDA, run every step eagerly instead of replaying it as one captured CUDA graph (for debugging)")
    a("--out", default=None,
      help="run folder (default runs/MODEL-DATASET-seedSEED). A sweep (lists in --seed, --beta, --gamma: every "
           "combination is a run, all trained together in this process) puts each run in a folder of its own under "
           "--out (default runs/MODEL-DATASET-sweep), named by its settings; a folder holds one run or runs below "
           "it, never both")
    a("--eval-samples", type=int, default=10_000,
      help="points for MIG / group-MIG (disentanglement_lib: 10,000); 0: every point of the data set")
    a("--resume", action="store_true", default=False,
      help="continue the run in --out from its checkpoint.pt (starts fresh when there is none). On a folder of runs: "
           "without --model, continue the unfinished runs below it (typed --seed, --beta, --gamma and run-defining "
           "flags select among them); with --model, the runs the command names, resumed where they are there")
    a("--eval-only", action="store_true", default=False,
      help="no training: evaluate the checkpoint in --out again and rewrite metrics.json and the figures")
    a("--metrics", type=parse_metrics, default=",".join(CHEAP_METRICS),
      help="what an evaluation scores: all, or some of mig, group_mig, modularity, sap, dci, factor_vae (MIG and "
           "group-MIG always), as disentanglement_lib computes them; the default takes seconds on a CPU, factor_vae "
           "minutes (README: Metrics)")
    a("--eval-every", type=int, default=0,
      help="steps between evaluations during training (MIG, group-MIG on the --eval-samples points of the final "
           "evaluation) into scores.csv and scores.png; 0: only the final evaluation")
    a("--checkpoint-every", type=int, default=5_000, help="steps between checkpoints")
    a("--log-every", type=int, default=500, help="steps between progress lines and log.csv rows")
    a("--summarize", metavar="RUNS_DIR", default=None,
      help="no training: summarise every run under RUNS_DIR into Figures 3(b), 3(c), 4 and results.md")
    return p


def _k_value(text):
    """argparse type of --k: a whole number, or rnd."""
    if text == "rnd":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or rnd, got '{text}'") from None


def _values(kind):
    """argparse type of --seed, --beta, --gamma: one value, or a comma-separated list of them (a sweep)."""
    def parse(text):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} values separated by commas, got '{text}'")
        if not values or len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"expected distinct {kind.__name__} values separated by commas, got "
                                             f"'{text}'")
        return values
    parse.__name__ = f"{kind.__name__} list"
    return parse


def parse_args(argv=None):
    """The command line -> its flags (--seed, --beta, --gamma as lists; beta and gamma None when not typed) and
    args.given, the flags the user typed."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.given = set(vars(build_parser(suppress_defaults=True).parse_args(argv)))
    return args


def read_flags(saved, path):
    """Flags saved by this program (a config.json, a checkpoint's args) -> a Namespace of those this
    program knows, read by the same parser as typed flags, so that they pass the same checks. --seed, --beta and
    --gamma come back as the single value a run holds."""
    def refuse(message):
        raise UserError(f"{path} holds a flag this program refuses: {message}")

    parser = build_parser(suppress_defaults=True, on_error=refuse)
    actions = {a.dest: a for a in parser._actions}
    argv = []
    for key, value in saved.items():
        if key not in actions or key in ("help", "resume", "eval_only", "out", "summarize") or value is None:
            continue  # not a run's flag (or one of another version of this program): left out
        flag = actions[key].option_strings[0]
        if isinstance(actions[key], argparse._StoreTrueAction):
            if not isinstance(value, bool):
                refuse(f"{flag} must be true or false, got {value!r}")
            argv += [flag] * value
        elif isinstance(value, list) and key in LIST_FLAGS:
            argv.append(f"{flag}={','.join(map(str, value))}")
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            argv.append(f"{flag}={value}")
        else:
            refuse(f"{flag} must be a {'list of numbers' if key in LIST_FLAGS else 'number or text'}, got {value!r}")
    flags = parser.parse_args(argv)
    for key in LIST_FLAGS:
        if hasattr(flags, key):
            if len(getattr(flags, key)) != 1:
                refuse(f"--{key} must be a single value for one run, got {getattr(flags, key)}")
            setattr(flags, key, getattr(flags, key)[0])
    return flags


def _exact(x):
    """A number as a folder name shows it: exactly (the float's repr; 10.0 -> 10), so two values never share a
    name (0.1 and 0.1000001 do under %g)."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def content_names(m):
    """A run's content factors as names in the data set's order, so that --content-factors typed in any order, or
    left to the data set's default, says one thing one way (m: a run's flags, a config's or a metrics.json)."""
    m = vars(m) if isinstance(m, argparse.Namespace) else m
    names = DATASET_FACTORS.get(m["dataset"]) or m.get("factor_names", ())
    chosen = m.get("content_factors") or DEFAULT_CONTENT.get(m["dataset"], ())
    return tuple(names[k] for k in resolve_factors(chosen, list(names)))


def run_name(args):
    """A run's identity as a folder name: every flag that defines the run (RUN_DEFINING), exactly, so that no two
    runs share a name and a run's folder never depends on which process trains it. Batch size, latent dims and
    content factors appear where they differ from the defaults; k only on k-factor pairs, where it means something."""
    name = (f"{args.model}_{args.dataset}_beta{_exact(args.beta)}_gamma{_exact(args.gamma)}_gs{args.group_size}_"
            f"tc-{args.tc_level}")
    if args.pairs != "groups":
        name += f"_pairs-{args.pairs}-k{args.k}"
    if args.batch_size != DEFAULTS["batch_size"]:
        name += f"_bs{args.batch_size}"
    if (args.latent_dim, args.content_dims) != (DEFAULTS["latent_dim"], DEFAULTS["content_dims"]):
        name += f"_z{args.latent_dim}-{args.content_dims}"
    if content_names(args) != DEFAULT_CONTENT[args.dataset]:
        name += "_c-" + "-".join(content_names(args))
    return name + f"_seed{args.seed}"


def looks_like_run_name(name):
    """Whether a folder name is in run_name()'s form (a folder a user named otherwise is not checked by it)."""
    return re.fullmatch(rf"({'|'.join(MODELS)})_({'|'.join(DATASETS)})_beta[^_]+_gamma[^_]+_gs\d+_tc-.+_seed\d+",
                        name) is not None


def is_run(folder):
    """A run folder holds the files of one run; any other folder may hold runs below it (a parent)."""
    return any((Path(folder) / f).exists() for f in ("config.json", "checkpoint.pt", "metrics.json"))


def runs_below(folder):
    """The run folders below `folder` (at any depth, never inside a run), sorted."""
    found = []
    for path in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        if path.is_dir() and not path.is_symlink():
            found += [path] if is_run(path) else runs_below(path)
    return found


def run_above(folder):
    """The run folder that holds `folder` (None: it is inside no run)."""
    return next((p for p in Path(folder).absolute().parents if is_run(p)), None)


def expand(args):
    """The runs a command line asks for -> a list of their flags, one Namespace per run (a single seed, beta and
    gamma), each checked. Every combination of the --seed, --beta and --gamma values is a run; more than one makes
    a sweep, whose runs each go in a folder of its own under --out, named by run_name(). --resume on a folder of
    runs without --model continues the runs found there (discover()). Sets args.sweep and args.out."""
    if args.resume and args.out is not None and "model" not in args.given and runs_below(args.out):
        args.sweep = args.discovered = True
        return discover(args)
    spec = MODELS[args.model]
    args.beta = [spec.beta] if args.beta is None else list(args.beta)
    args.gamma = [spec.gamma] if args.gamma is None else list(args.gamma)
    args.seed = list(args.seed) if isinstance(args.seed, list) else [args.seed]
    combinations = list(itertools.product(args.seed, args.beta, args.gamma))
    args.sweep = len(combinations) > 1
    if args.out is None:
        args.out = f"runs/{args.model}-{args.dataset}-" + ("sweep" if args.sweep else f"seed{args.seed[0]}")
    members = []
    for seed, beta, gamma in combinations:
        m = argparse.Namespace(**vars(args))
        m.seed, m.beta, m.gamma, m.sweep, m.given = seed, beta, gamma, False, set(args.given)
        m.parent = args.out if args.sweep else None  # a sweep's run: its folder's name must be its run_name()
        # checked now, or (a run alone resumed or re-evaluated) once the flags saved in its folder have joined the
        # typed ones, in prepare_run() or eval_only()
        members.append(m if (args.resume and not args.sweep) or args.eval_only else check_args(m))
        if args.sweep:
            m.out = str(Path(args.out) / run_name(m))
    if args.sweep and len({m.out for m in members}) < len(members):
        raise UserError("--seed, --beta and --gamma name some run twice; give distinct values")
    others = runs_below(args.out) if args.sweep and args.resume else []
    if others and not any(is_run(m.out) for m in members):
        raise UserError(f"--resume: none of the {len(members)} runs this command names is in {args.out}, which holds "
                        f"{len(others)} other runs (such as {others[0].name}); leave out --model to continue those, "
                        "or leave out --resume to start these")
    return members


def discover(args):
    """--resume --out PARENT: the runs below PARENT, each with the flags saved in its folder and the flags typed
    now that do not define a run (--steps, --device, ...). Typed --seed, --beta, --gamma lists and run-defining
    flags select among them; what selects none is refused."""
    chosen, found = [], runs_below(args.out)
    for folder in found:
        path = next((folder / f for f in ("config.json", "checkpoint.pt") if (folder / f).is_file()), None)
        if path is None:
            print(f"{folder}: an evaluated run without its checkpoint or config; nothing to resume", file=sys.stderr)
            continue
        # the flags from the small config.json, not the weights (prepare_run() checks that the two describe one run)
        saved = read_config(path) if path.name == "config.json" else load_checkpoint(path)["args"]
        flags = read_flags(saved, path)
        if not all(getattr(flags, k, None) in getattr(args, k) if k in LIST_FLAGS else
                   _same_flag(k, getattr(args, k), getattr(flags, k, None), saved)
                   for k in RUN_DEFINING if k in args.given):
            continue
        m = argparse.Namespace(**(vars(args) | {k: v for k, v in vars(flags).items() if k not in args.given}))
        m.seed, m.beta, m.gamma = flags.seed, flags.beta, flags.gamma
        m.out, m.sweep, m.given = str(folder), False, set(args.given) - set(LIST_FLAGS)
        m.parent = str(folder.parent) if looks_like_run_name(folder.name) else None
        chosen.append(m)
    if not chosen:
        shown = lambda v: ",".join(map(str, v)) if isinstance(v, list) else v  # noqa: E731
        typed = ", ".join(f"--{k.replace('_', '-')} {shown(getattr(args, k))}" for k in RUN_DEFINING
                          if k in args.given)
        raise UserError(f"--resume: no run below {args.out} has {typed} (it holds {len(found)} runs, such as "
                        f"{found[0].name}); leave those flags out to continue every run there")
    return chosen


def check_args(args):
    """Every check of a run's flags with a message that names the flag; also run on flags read back from a run
    folder."""
    resolve_device(args.device)
    for flag in ("steps", "batch_size", "latent_dim", "content_dims", "checkpoint_every", "log_every"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.group_size < 2:
        raise UserError(f"--group-size must be at least 2 (a group of observations), got {args.group_size}")
    if args.eval_every < 0:
        raise UserError(f"--eval-every must be 0 (only at the end) or a number of steps, got {args.eval_every}")
    n_points = math.prod(DATASET_SIZES[args.dataset])
    if args.eval_samples != 0 and not MIN_EVAL_SAMPLES <= args.eval_samples <= n_points:
        raise UserError(f"--eval-samples must be 0 (all points) or {MIN_EVAL_SAMPLES:,} .. {n_points:,} (the points "
                        f"of {args.dataset}; disentanglement_lib: 10,000), got {args.eval_samples:,}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be a whole number from 0 to {MAX_SEED:,}, got {args.seed}")
    for flag in ("beta", "gamma"):
        if not 0 <= getattr(args, flag) <= float(np.finfo(np.float32).max):
            raise UserError(f"--{flag} must be a non-negative number a float32 holds (up to 3.4e38), got "
                            f"{getattr(args, flag)}")
    content_names(args)  # a misspelt content factor, refused before any folder is written
    if args.model in ADAPTIVE and args.group_size != 2:
        raise UserError(f"--group-size {args.group_size}: {args.model} learns from pairs; use --group-size 2")
    if args.model not in ADAPTIVE and args.pairs != "groups":
        raise UserError(f"--pairs {args.pairs}: {args.model} must be told which group of factors a pair shares, so "
                        f"it takes --pairs groups; the k-factor pairs are for {' and '.join(ADAPTIVE)}")
    n_factors = len(DATASET_FACTORS[args.dataset])
    if args.k != "rnd" and not 1 <= args.k < n_factors:
        raise UserError(f"--k must be rnd or 1 .. {n_factors - 1} ({args.dataset} has {n_factors} factors), got "
                        f"{args.k}")
    if args.content_dims >= args.latent_dim:
        raise UserError(f"--content-dims ({args.content_dims}) must be smaller than --latent-dim "
                        f"({args.latent_dim}): both latent groups need at least one dim")
    return args


def device_available(name):
    """Whether --device `name` is one this machine has."""
    try:
        resolve_device(name)
        return True
    except UserError:
        return False


def resolve_device(name):
    """--device -> a torch.device that this machine has; a clear error for a misspelt or missing one."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device: unsupported device '{name}'; expected auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine; use --device cpu or auto")
    return device


# ----------------------------------------------------------------------------------------------------------------
# The training loop: the step on the device; the host looks only when logging, evaluating or checkpointing.
# ----------------------------------------------------------------------------------------------------------------
def build_runs(members, checkpoints=None, paths=None):
    """The Runs of these flags (one data set, on one device), each loaded from its checkpoint (None: step 0)."""
    a = members[0]
    device = resolve_device(a.device)
    data = load_dataset(a.dataset, a.data_dir, device, a.allow_subgrid)
    if a.eval_samples > data.num_points:
        raise UserError(f"--eval-samples {a.eval_samples:,} is more than the {data.num_points:,} points of "
                        f"{data.name}; give 0 (every point) or fewer")
    names = a.content_factors if a.content_factors is not None else data.content_factors
    content_factors = resolve_factors(names, list(data.factor_names))
    runs = [Run(m, data, content_factors, device) for m in members]
    for run, checkpoint, path in zip(runs, checkpoints or [None] * len(runs), paths or [None] * len(runs)):
        if checkpoint is not None:
            run.load(checkpoint, path)
    steps = {r.step for r in runs}
    if len(steps) != 1:  # they share one step counter (and, stacked, one Adam step count per tensor)
        raise UserError(f"runs trained together must stand at one step; these stand at {sorted(steps)}")
    return runs


def cpu_vendor():
    """The processor's maker as Linux names it (GenuineIntel, AuthenticAMD), or the architecture elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            vendor = next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), None)
    except OSError:
        vendor = None
    return vendor or platform.machine() or "unknown"


def machine(device):
    """What a run's sums depend on besides its flags and thread count: the torch build, and the processor's
    instruction set (on the CPU torch and its convolutions' oneDNN pick their kernels by it; ATEN_CPU_CAPABILITY and
    ONEDNN_MAX_CPU_ISA cap them, each on its own) and its maker (capped at AVX2, an Intel Xeon's sums still differ from
    an AMD EPYC's) or the accelerator."""
    if device.type == "cpu":
        onednn = os.environ.get("ONEDNN_MAX_CPU_ISA")
        return (f"torch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()} ({cpu_vendor()})"
                + (f", oneDNN up to {onednn}" if onednn else ""))
    return f"torch {torch.__version__}, " + (torch.cuda.get_device_name(device) if device.type == "cuda" else
                                             device.type.upper())


def progress_line(step, total, names, means, ms):
    eta = ms * (total - step) / 1000
    return (f"step {step:>{len(str(total))}}/{total}  " + "  ".join(f"{n} {v:.4g}" for n, v in zip(names, means)) +
            f"  {ms:.1f} ms/step  ETA {format_seconds(eta)}")


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def train(members, checkpoints, sweep=False):
    """Train a set of runs together (one: an ordinary run, unless sweep says it belongs to one), each into its own
    folder (held by this process and read by prepare_run(): checkpoints[i] is members[i]'s, None for step 0).
    Returns (Sweep, the indices of the runs that trained to the end).
    Writes each run's config.json, log.csv and checkpoint.pt; a run whose loss goes NaN stops alone."""
    a, S, sweep = members[0], len(members), sweep or len(members) > 1
    ckpt_paths = [Path(m.out) / "checkpoint.pt" for m in members]
    runs = Sweep(build_runs(members, checkpoints, ckpt_paths))
    device, names = runs.runs[0].device, MODELS[a.model].terms
    log_sum, log_count = torch.zeros(S, len(names), device=device), 0
    if any(c is not None for c in checkpoints):
        log_sum = torch.stack([c["log_sum"] for c in checkpoints]).to(device)
        log_count = checkpoints[0]["log_count"]
        print(f"resuming {a.out if not sweep else f'{S} run' + 's' * (S > 1)} at step {runs.step:,}", file=sys.stderr)
    logs, threads = [], torch.get_num_threads()
    for m, run in zip(members, runs.runs):
        write_text_atomic(Path(m.out) / "config.json", json.dumps(public_args(m), indent=2) + "\n")
        logs.append(RunLog(m, names, runs.step, sweep))
        for saved, now, what in ((run.threads, threads, " torch thread(s)"), (run.machines, machine(device), "")):
            if saved and saved[-1] != now:
                print(f"note: {m.out} trained with {saved[-1]}{what} and continues with {now}{what}: the sums "
                      "depend on it, so from here on it is not the uninterrupted run", file=sys.stderr)
            saved += [now] if saved[-1:] != [now] else []  # each change, in order
    alive = list(range(S))

    stop = StopRequest()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    listed = lambda key: ",".join(f"{v:g}" for v in sorted({getattr(m, key) for m in members}))  # noqa: E731
    flags = ["seed"] * sweep + ["beta"] + ["gamma"] * (a.model == "group_tcvae")
    print(f"training {a.model} on {runs.runs[0].data.name} ({device}): {S} run{'s' * (S > 1)} of {a.steps:,} steps of "
          f"{a.batch_size} groups of {a.group_size}, " + ", ".join(f"{k} {listed(k)}" for k in flags)
          + (f", TC level {a.tc_level}" if a.model == "group_tcvae" else "")
          + (f", {a.pairs} pairs (k {a.k})" if a.pairs != "groups" else ""), file=sys.stderr)
    last_step, last_time = runs.step, time.perf_counter()
    first = runs.step + 1
    try:
        while runs.step < a.steps and not stop.requested and alive:
            log_sum += runs.train_step()
            log_count += 1
            step = runs.step
            at_log, at_ckpt = step % a.log_every == 0 or step == a.steps, step % a.checkpoint_every == 0
            at_eval = a.eval_every and step % a.eval_every == 0
            if not (at_log or at_ckpt or at_eval or step == first):
                continue
            means = (log_sum / max(log_count, 1)).tolist()  # the one host sync, every log / checkpoint / eval step
            now = time.perf_counter()
            for k in alive:  # in a sweep, each run counts its share of the time
                runs.runs[k].train_seconds += (now - last_time) / len(alive)
            for k in list(alive):
                if all(math.isfinite(v) for v in means[k]):
                    continue
                message = (f"the loss became NaN or infinite between steps {last_step:,} and {step:,} "
                           f"({dict(zip(names, means[k]))}); stopped. The last good checkpoint is kept at "
                           f"{ckpt_paths[k] if ckpt_paths[k].exists() else '(none written yet)'}")
                if not sweep:
                    raise UserError(message)
                logs[k].say(message)
                print(f"{members[k].out}: {message}; the other runs go on", file=sys.stderr)
                alive.remove(k)
            ms = 1000 * (now - last_time) / max(step - last_step, 1)
            if step == first and not at_log and alive:  # a first sign of life, well before the first --log-every
                print(progress_line(step, a.steps, names if not sweep else [f"{len(alive)}/{S} runs, loss (run 1)"],
                                    means[alive[0]] if not sweep else means[alive[0]][:1], ms)
                      + "  (first step: includes start-up)", file=sys.stderr)
            if at_log:
                for k in alive:
                    logs[k].row(step, means[k], ms)
                    logs[k].say(progress_line(step, a.steps, names, means[k], ms))
                if not sweep:
                    print(progress_line(step, a.steps, names, means[0], ms), file=sys.stderr)
                elif alive:
                    loss = np.array([means[k][0] for k in alive])
                    print(progress_line(step, a.steps, [f"{len(alive)}/{S} runs, loss min", "median", "max"],
                                        [loss.min(), np.median(loss), loss.max()], ms), file=sys.stderr)
                log_sum, log_count = torch.zeros_like(log_sum), 0
            if at_ckpt or step == a.steps:
                for k in alive:
                    runs.save(k, ckpt_paths[k], log_sum[k], log_count)
            if at_eval:  # scores over training, on each run's final evaluation's points (not counted as training)
                for k in alive:
                    r = runs.runs[k]
                    scores = evaluate(r.vae, r.data, r.content_factors, a.content_dims, a.eval_samples, r.args.seed)
                    logs[k].scores_row(step, scores[0])
            last_step, last_time = step, time.perf_counter()
        for k in alive:
            runs.runs[k].train_seconds += (time.perf_counter() - last_time) / max(len(alive), 1)
        if stop.requested:
            for k in alive:
                if torch.isfinite(log_sum[k]).all():
                    runs.save(k, ckpt_paths[k], log_sum[k], log_count)
            where = a.out if not sweep else Path(a.out).parent
            print(f"stopped at step {runs.step:,}; checkpoint{'s' if sweep else ''} written. Continue with: "
                  f"python grouptc.py --resume --out {where}", file=sys.stderr)
            raise SystemExit(130)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return runs, alive


ACTIVATION_BYTES = 2 * 2 ** 20  # per image of a batch: a generous bound on what a step's activations take


def available_memory(device):
    """Bytes free on `device` for new tensors (the CPU: MemAvailable), or None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = Path("/proc/meminfo").read_text()
        return int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo)[1]) * 1024
    except (OSError, TypeError):
        return None


def check_memory(members):
    """A sweep's memory, estimated from its weights (and their gradients and Adam's two moments, float32) and its
    activations, against what the device has free: refused before anything is written when it cannot fit."""
    a, device = members[0], resolve_device(members[0].device)
    channels = 3 if a.dataset.startswith("shapes3d") else 1
    with torch.device("meta"):  # shapes only, no memory
        nets = [VAE(channels, a.latent_dim)] + [Discriminator(a.latent_dim)] * (a.model == "group_tcvae")
    per_run = 16 * sum(p.numel() for n in nets for p in n.parameters()) + \
        a.batch_size * a.group_size * ACTIVATION_BYTES
    free = available_memory(device)
    if free is not None and len(members) * per_run > free:
        raise UserError(f"{len(members)} runs trained together need about {len(members) * per_run / 2 ** 20:,.0f} "
                        f"MiB ({per_run / 2 ** 20:,.0f} MiB a run) and {device} has {free / 2 ** 20:,.0f} MiB free: "
                        f"about {free // per_run} would fit; give fewer --seed, --beta, --gamma values at a time")


def train_sweep(args, members):
    """A sweep: its runs trained together, then each evaluated into its own folder, each a run in its own right
    (--resume, --eval-only, --summarize work on it alone), named by its settings under the sweep's --out. Runs that
    differ in more than seed, beta and gamma, or stand at different steps (one was resumed alone, say), train in
    turn, each set together. Returns the exit status: 2 if a run's loss went NaN."""
    out = Path(args.out)
    if is_run(out) or run_above(out) is not None:
        raise UserError(f"--out {out} is a run's folder{' or inside one' if not is_run(out) else ''}; a sweep puts "
                        "its runs in folders of their own under --out: choose a folder that holds no run")
    with contextlib.ExitStack() as held:
        for m in members:
            held.enter_context(RunFolderLock(m.out))
        prepared = [(m, prepare_run(m)) for m in members]
        together = {}  # runs that agree on every other flag and stand at one step train as one set
        for m, checkpoint in prepared:
            if checkpoint is not False:
                shape = {k: v for k, v in public_args(m).items() if k not in (*LIST_FLAGS, "out")}
                key = (checkpoint["step"] if checkpoint else 0, json.dumps(shape, sort_keys=True, default=str))
                together.setdefault(key, []).append((m, checkpoint))
        failed = 0
        for key in sorted(together):
            check_memory([m for m, _ in together[key]])
            runs, alive = train(*map(list, zip(*together[key])), sweep=True)
            failed += len(runs) - len(alive)
            for k in alive:
                evaluate_and_plot(runs.runs[k], runs.runs[k].args.out, runs.runs[k].args.eval_samples)
    if failed:
        print(f"{failed} of {len(members)} runs stopped on a NaN or infinite loss (see their train.log)",
              file=sys.stderr)
    return 2 if failed else 0


def eval_only(args):
    """Evaluate the run saved in args.out again: metrics.json and the figures."""
    path = Path(args.out) / "checkpoint.pt"
    checkpoint = load_checkpoint(path)
    merge_saved_args(args, checkpoint["args"], path)
    check_one_run(args, Path(args.out) / "config.json", path)
    run, = build_runs([args], [checkpoint], [path])
    return evaluate_and_plot(run, args.out, args.eval_samples)


# ----------------------------------------------------------------------------------------------------------------
# The field's other scores, as disentanglement_lib computes them: DCI, SAP, modularity, the FactorVAE score.
# ----------------------------------------------------------------------------------------------------------------
# Not the paper's (it reports MIG and group-MIG); here so that a run's numbers stand beside the field's (Locatello et
# al. 2020 report all of them). Layout as mig(): codes (N, L) encoder means, factors (N, K) integer classes; DCI and
# SAP are fitted on one draw of points and scored on another (DL: 10,000 and 5,000), not on a split.
_KERNELS = []  # the Numba kernels below: plain Python until _compile_kernels() compiles them


def _numba(f):
    _KERNELS.append(f.__name__)
    return f


def _compile_kernels():
    """numba.njit every kernel marked @_numba, once (cached on disk), in place of its Python definition; kept out
    of `import grouptc`, which stays fast."""
    if _KERNELS:
        import numba
        for name in _KERNELS:
            globals()[name] = numba.njit(cache=True, nogil=True)(globals()[name])
        _KERNELS.clear()


_EPS = np.finfo(np.float64).eps
_TIE = np.float32(1e-7)  # sklearn's FEATURE_THRESHOLD: values closer than this (in float32 arithmetic) are one value


@_numba
def _best_splits(idx, v, g, b, e, total, inv, top, top_at, top_sl, sl):
    """Best squared-error split, per feature j, of a node whose samples idx[j, 2p] (p in b..e-1) are sorted by their
    values v[j, 2p + 1] (the int32 and float32 views of the packed words, see _fit_tree): the maximum of sklearn's
    proxy sum_l^2 / n_l + sum_r^2 / n_r over the positions p between two values more than 1e-7 apart (in float32,
    as sklearn); the first maximum wins. -> top[j] (-inf: no candidate), top_at[j] = p, top_sl[j] = sum_l;
    sl: scratch. All the features in one sweep: their running sums are independent chains, run in parallel."""
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


@_numba
def _partition(words, idx, out, left, b, e, r):
    """Stable partition of the packed words[b:e] (sample idx[2p]) into out[b:r] (samples with left[s]) and out[r:e]."""
    l = b
    for p in range(b, e):
        go = left[idx[2 * p]]
        q = r + (l - r) * go  # arithmetic, not a branch: the direction is unpredictable
        out[q] = words[p]
        l += go
        r += 1 - go


@_numba
def _fit_tree(x, words, g, h, leaf_scale, max_depth, feat, thr, val, imp, node, work, left, inv):
    """Grow one regression tree of depth <= max_depth on the negative gradient g as sklearn's
    DecisionTreeRegressor(splitter="best", criterion="squared_error") does: exact greedy splits, thresholds at
    midpoints between sorted values more than 1e-7 apart, no split of a node with < 2 samples or variance <= eps.
    Nodes in heap order (children of n: 2n+1, 2n+2). x (N, L) float32; words (L, N) int64: per feature, the samples
    sorted by it, each an 8-byte word holding the sample's index (int32 view, even slots) and value (float32 view,
    odd slots); one sort serves every tree. Leaf value = leaf_scale * sum(g) / sum(h), h = p (1 - p): sklearn's
    Newton step. Fills feat (-1: leaf), thr, val; adds each split's impurity decrease to imp; node <- each sample's
    leaf. work (2, L, N) int64, left (N,) uint8: scratch; inv[n] = 1 / n.
    Each node's samples stay sorted by every feature in one contiguous segment (stable partitions down the tree),
    so a level costs one sweep and one partition: O(N L)."""
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


@_numba
def _apply(x, feat, thr, val, out, scale):
    """out[s] += scale * the value of the leaf (of one heap-ordered tree) that x[s] falls in."""
    for s in range(x.shape[0]):
        n = 0
        while feat[n] >= 0:
            n = 2 * n + 1 if x[s, feat[n]] <= thr[n] else 2 * n + 2
        out[s] += scale * val[n]


@_numba
def _gbt(x, words, y, n_classes, x_test, seed, n_stages, learning_rate, max_depth):
    """GradientBoostingClassifier() with log-loss. Init: the log prior odds (2 classes: one tree a stage, on the
    logit) or the log priors minus their mean (K > 2: per stage one tree per class, all on the softmax gradients of
    the stage's start; leaf values times (K - 1) / K). -> (L,) summed impurity decreases; (T, N) train and (T, M)
    test raw predictions, T = 1 or K."""
    np.random.seed(seed)
    N, L = x.shape
    T = 1 if n_classes == 2 else n_classes
    n_nodes = 2 ** (max_depth + 1) - 1
    prior = np.zeros(n_classes)
    for s in range(N):
        prior[y[s]] += 1.0
    prior = np.minimum(np.maximum(prior / N, _EPS), 1 - _EPS)  # sklearn clips the prior to [eps, 1 - eps]
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
            _apply(x_test, feat, thr, val, raw_test[k], learning_rate)
    return imp, raw, raw_test


def sorted_words(x):
    """x (N, L) float32 -> (L, N) int64: per feature, the samples sorted by it, each as one word packing the sample's
    index (the int32 view's even slots) and its value (the float32 view's odd slots)."""
    order = np.argsort(x, axis=0, kind="stable").T
    words = np.empty(order.shape, np.int64)
    words.view(np.int32)[:, 0::2] = order
    words.view(np.float32)[:, 1::2] = np.take_along_axis(x.T, order, 1)
    return words


def gbt_classifier(codes, labels, test_codes, seed=0, n_stages=100, learning_rate=0.1, max_depth=3, words=None):
    """Fit sklearn's GradientBoostingClassifier() (defaults: 100 stages, depth 3, rate 0.1, log-loss, subsample 1,
    min_samples_split 2, min_samples_leaf 1; friedman_mse picks the same splits as squared error, which sklearn
    1.9.1 uses) on codes (N, L) and labels (N,) in 0..C-1 (C >= 2, all present). Codes are rounded to float32 as
    sklearn does. seed only breaks exact ties between features (sklearn: random_state).
    feature_importances_ = the trees' summed impurity decreases, normalised to sum 1 (sklearn averages the trees'
    unnormalised importances, then normalises: the same).
    words: sorted_words() of the float32 codes, when the caller fits several classifiers on them.
    -> (feature_importances_ (L,), train predictions (N,), test predictions (M,)), predictions as label indices."""
    _compile_kernels()
    x = np.ascontiguousarray(codes, dtype=np.float32)
    words = sorted_words(x) if words is None else words
    imp, raw, raw_test = _gbt(x, words, np.ascontiguousarray(labels, dtype=np.int64), int(labels.max()) + 1,
                              np.ascontiguousarray(test_codes, dtype=np.float32), seed, n_stages, learning_rate,
                              max_depth)

    def predict(r):  # sklearn: class 1 when raw >= 0 (binary), else argmax
        return (r[0] >= 0).astype(np.int64) if len(r) == 1 else r.argmax(0)
    return (imp / imp.sum() if imp.sum() > 0 else imp), predict(raw), predict(raw_test)


def _entropy(p, base):
    """scipy.stats.entropy(p, base=base) along axis 0 (p normalised first)."""
    p = p / p.sum(0)
    return -(p * np.log(p)).sum(0) / math.log(base)


def dci_from_importance(R):
    """DL's disentanglement and completeness of an (L codes, K factors) importance matrix: 1e-11 added, entropies in
    base K (per code) and base L (per factor), weighted by the code's / factor's share of R (uniform if R = 0)."""
    L, K = R.shape
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


def dci(codes, factors, test_codes, test_factors, seed=0):
    """DL's DCI (Eastwood & Williams 2018 with gradient-boosted trees): per factor, GradientBoostingClassifier() on
    (codes, factor); R[:, k] = its feature_importances_; disentanglement and completeness of R as
    dci_from_importance; informativeness_train / _test = mean over factors of the classification accuracy.
    A factor with a single train class (sklearn refuses it) gets R[:, k] = 0 and the constant prediction. The
    factors are fitted in parallel on torch's thread count (the kernels release the GIL)."""
    codes, test_codes = np.asarray(codes, np.float64), np.asarray(test_codes, np.float64)
    L, K = codes.shape[1], factors.shape[1]
    _compile_kernels()
    words = sorted_words(codes.astype(np.float32))  # one sort of the codes serves every factor's trees

    def fit(k):
        C, y, y_test = _classes(factors[:, k], test_factors[:, k])
        if C < 2:
            r, p, p_test = np.zeros(L), np.zeros(len(y), np.int64), np.zeros(len(y_test), np.int64)
        else:
            r, p, p_test = gbt_classifier(codes, y, test_codes, seed + k, words=words)
        return r, np.mean(p == y), np.mean(p_test == y_test)
    order = sorted(range(K), key=lambda k: -len(np.unique(factors[:, k])))  # the costliest first
    with concurrent.futures.ThreadPoolExecutor(max(1, min(K, torch.get_num_threads()))) as pool:
        fits = dict(zip(order, pool.map(fit, order)))
    R = np.stack([fits[k][0] for k in range(K)], 1)
    d, c = dci_from_importance(R)
    return {"disentanglement": d, "completeness": c,
            "informativeness_train": float(np.mean([fits[k][1] for k in range(K)])),
            "informativeness_test": float(np.mean([fits[k][2] for k in range(K)])), "importance_matrix": R}


# ---------------------------------------------------------------------------------------------------------------
# SAP: sklearn's LinearSVC(C=0.01, class_weight="balanced") on each single code, solved exactly
# ---------------------------------------------------------------------------------------------------------------

@_numba
def _l2svm(x, t, c):
    """argmin over (a, b) of 0.5 (a^2 + b^2) + sum_n c_n max(0, 1 - t_n (a x_n + b))^2, t = +-1: liblinear's
    L2-regularised squared-hinge SVM with the intercept as a regularised constant feature. Newton steps with
    backtracking; stops once a full step keeps the set of margin violators, where the piecewise-quadratic objective
    is exactly minimised."""
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


@_numba
def _linear_svc(x, y, n_classes, C):
    """LinearSVC(C, class_weight="balanced") on 1-D x, labels y in 0..n_classes-1 -> (coef (n), intercept (n)),
    n = 1 for two classes. Balanced weights w_c = N / (n_classes N_c). Two classes: one problem, class 1 positive,
    each sample's weight C w_y. More: liblinear's one-vs-rest, the positives (class c) C w_c, the negatives plain C."""
    N = len(x)
    counts = np.zeros(n_classes)
    for n in range(N):
        counts[y[n]] += 1
    w = N / (n_classes * counts)
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
    _compile_kernels()
    return _linear_svc(np.ascontiguousarray(x, np.float64), np.ascontiguousarray(y, np.int64), n_classes, C)


def sap_matrix(codes, factors, test_codes, test_factors, C=0.01):
    """S[i, k] = test accuracy of LinearSVC(C=0.01, class_weight="balanced") fitted on code i alone to factor k;
    prediction = class 1 when the score > 0 (two classes), else argmax of the class scores. A factor with a single
    train class (sklearn refuses it) is predicted constant."""
    codes, test_codes = np.asarray(codes, np.float64), np.asarray(test_codes, np.float64)
    L, K = codes.shape[1], factors.shape[1]
    S = np.zeros((L, K))
    for k in range(K):
        n_classes, y, y_test = _classes(factors[:, k], test_factors[:, k])
        for i in range(L):
            if n_classes < 2:
                pred = np.zeros(len(y_test), np.int64)
            else:
                a, b = linear_svc_1d(codes[:, i], y, n_classes, C)
                score = test_codes[:, i, None] * a + b
                pred = (score[:, 0] > 0).astype(np.int64) if n_classes == 2 else score.argmax(1)
            S[i, k] = np.mean(pred == y_test)
    return S


def sap_from_matrix(S):
    """Mean over factors of the gap between the two largest entries of the factor's column of S (L >= 2)."""
    top = np.sort(S, axis=0)
    return float(np.mean(top[-1] - top[-2]))


def sap(codes, factors, test_codes, test_factors):
    """DL's SAP score, discrete form (Kumar et al. 2018): sap_from_matrix(sap_matrix(...))."""
    return sap_from_matrix(sap_matrix(codes, factors, test_codes, test_factors))


# ---------------------------------------------------------------------------------------------------------------
# Modularity (Ridgeway & Mozer 2018)
# ---------------------------------------------------------------------------------------------------------------

def modularity_from_matrix(mi):
    """DL's modularity of an (L, K) MI matrix: per code 1 - (sum_k m^2 - max_k m^2) / (max_k m^2 (K - 1)), 0 for a
    code whose MI is all 0; mean over all codes."""
    sq = np.square(mi)
    top = sq.max(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = 1 - (sq.sum(1) - top) / (top * (sq.shape[1] - 1))
    return float(np.mean(np.where(top == 0, 0.0, score)))


def modularity(codes, factors, n_bins=20):
    """DL's modularity on the 20-bin MI matrix (grouptc's mutual_info_and_entropy: numpy.histogram's equal-width
    bins per code, plug-in MI in nats), on the training points."""
    return modularity_from_matrix(mutual_info_and_entropy(codes, factors, n_bins)[0])


# ---------------------------------------------------------------------------------------------------------------
# FactorVAE score (Kim & Mnih 2018)
# ---------------------------------------------------------------------------------------------------------------

def factor_vae_votes(batches, global_var, active):
    """batches (V, B, L): the codes of V votes' B-point batches -> (V,) the index, among the active dims, of the
    dim with the smallest var(ddof=1) / global var (DL's argmin; NaN (0 / 0) counts as smallest, as numpy's)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.argmin(batches.var(axis=1, ddof=1)[:, active] / global_var[active], axis=1)


def factor_vae_accuracy(train_factor, train_dim, eval_factor, eval_dim, n_factors, n_dims):
    """Majority-vote classifier: each dim predicts the factor that won most of its training votes (ties: the lowest
    factor index; a dim without votes: factor 0). -> (train accuracy, eval accuracy): the share of votes whose
    factor is the one their dim predicts."""
    train, ev = np.zeros((n_factors, n_dims), np.int64), np.zeros((n_factors, n_dims), np.int64)
    np.add.at(train, (train_factor, train_dim), 1)
    np.add.at(ev, (eval_factor, eval_dim), 1)
    predict = train.argmax(0)
    cols = np.arange(n_dims)
    return float(train[predict, cols].sum() / train.sum()), float(ev[predict, cols].sum() / ev.sum())


def factor_vae_score(encode, factor_sizes, rng, n_train=10_000, n_eval=5_000, n_var=10_000, batch_size=64,
                     prune=0.05, votes_per_call=256, progress=None):
    """DL's FactorVAE score. encode: (M, K) int64 factor classes -> (M, L) codes (the encoder means, a function of
    the classes); it is called on the n_var points, then on the votes' distinct points, votes_per_call * batch_size
    at a time. rng: numpy Generator (or seed).
    Global var (ddof 1) of n_var uniform points; dims with std < prune are dropped (DL's study: 0.05; its function
    default: 0). A vote: factor k uniform; batch_size uniform factor vectors, column k set to the first row's value;
    argmin over active dims of var(ddof 1) / global var. Majority-vote classifier from n_train votes, scored on
    n_eval fresh ones. A point that recurs among the votes is encoded once (DL's counts on dSprites: about 537,000
    distinct of 960,000), which gives the same score as long as a point's code does not depend on what else is in
    its batch (on the CPU it did not, for the run checked). progress: None, or called with (points encoded, points
    to encode) after each call.
    -> dict: eval_accuracy (the score; 0 without an active dim), train_accuracy, n_active."""
    rng = np.random.default_rng(rng)
    sizes = np.asarray(factor_sizes, np.int64)
    K = len(sizes)
    global_var = np.asarray(encode(rng.integers(0, sizes, (n_var, K))), np.float64).var(0, ddof=1)
    active = np.sqrt(global_var) >= prune
    if not active.any():
        return {"eval_accuracy": 0.0, "train_accuracy": 0.0, "n_active": 0}
    ks, batches = [], []  # every vote's factor and batch, drawn as votes_per_call votes at a time
    for n in (n_train, n_eval):
        for start in range(0, n, votes_per_call):
            m = min(votes_per_call, n - start)
            ks.append(rng.integers(0, K, m))
            f = rng.integers(0, sizes, (m, batch_size, K))
            f[np.arange(m), :, ks[-1]] = f[np.arange(m), 0, ks[-1]][:, None]
            batches.append(f.reshape(-1, K))
    bases = index_bases(sizes)
    flat, where = np.unique(np.concatenate(batches) @ bases, return_inverse=True)  # the distinct points
    chunk = votes_per_call * batch_size
    codes = []
    for start in range(0, len(flat), chunk):
        classes = flat[start:start + chunk, None] // bases % sizes
        codes.append(np.asarray(encode(classes), np.float64))
        if progress:
            progress(n_var + start + len(classes), n_var + len(flat))
    codes, where = np.concatenate(codes), where.reshape(n_train + n_eval, batch_size)
    dims = np.concatenate([factor_vae_votes(codes[where[v:v + votes_per_call]], global_var, active)
                           for v in range(0, len(where), votes_per_call)])  # a few MB of codes at a time
    k = np.concatenate(ks)
    train_acc, eval_acc = factor_vae_accuracy(k[:n_train], dims[:n_train], k[n_train:], dims[n_train:], K,
                                              int(active.sum()))
    return {"eval_accuracy": eval_acc, "train_accuracy": train_acc, "n_active": int(active.sum())}


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and figures: the scores of a run, Figure 3(a), Figure 5, the training curves.
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_means(vae, data, classes, batch=1024, progress=True):
    """(N, K) classes -> (N, L) encoder means as float64 numpy, encoded in batches on the data's device."""
    vae.eval()
    codes = []
    for i in range(0, len(classes), batch):
        codes.append(vae.encode(data.images(classes[i:i + batch]))[0].float().cpu())
        if progress:
            _progress(f"encoding {len(classes):,} points", i + len(codes[-1]), len(classes))
    vae.train()
    return torch.cat(codes).double().numpy()


SCORES = {  # what evaluate() can score: metrics.json key -> name in tables and figures
    "mig": "MIG", "group_mig": "group-MIG",  # the paper's
    "factor_vae_score": "FactorVAE score", "dci_disentanglement": "DCI disentanglement",
    "dci_completeness": "DCI completeness", "dci_informativeness": "DCI informativeness", "sap": "SAP",
    "modularity": "modularity"}
METRICS = {  # --metrics: a metric -> the scores it gives
    "mig": ("mig",), "group_mig": ("group_mig",), "modularity": ("modularity",), "sap": ("sap",),
    "dci": ("dci_disentanglement", "dci_completeness", "dci_informativeness"), "factor_vae": ("factor_vae_score",)}
CHEAP_METRICS = ("mig", "group_mig", "modularity", "sap")  # seconds on a CPU; dci ~25 s a core, factor_vae more
PAPER_METRICS = ("mig", "group_mig")  # the scores over training (--eval-every)


def random_points(data, n_samples, seed):
    """(n_samples, K) uniform random factor classes of `data` from a generator of its own (0: every point)."""
    if n_samples == 0:
        return index_to_classes(torch.arange(data.num_points, device=data.device), data.factor_sizes)
    return uniform_classes(data.factor_sizes, (n_samples,),
                           torch.Generator(device=data.device).manual_seed(seed))


def evaluate(vae, data, content_factors, content_dims, n_samples=10_000, seed=0, metrics=PAPER_METRICS):
    """The scores of `metrics` (names of METRICS) for the encoder means of n_samples uniform random points of
    `data` (0: every point); SAP and DCI are scored on half as many fresh points (DL: 10,000 and 5,000).
    content_factors: indices of the content factors; z_c is the last content_dims dims of the code.
    -> (scores, codes, classes): scores with the keys of the metrics, the MI matrix (and, with sap and dci, their
    matrices) and what they are over; codes (N, L) and classes (N, K) of the points."""
    t0 = time.perf_counter()
    classes = random_points(data, n_samples, seed + 7)
    codes = encode_means(vae, data, classes)
    if not np.isfinite(codes).all():
        raise UserError("the encoder gives NaN or infinite codes (its weights hold NaN or infinite values); nothing "
                        "was scored or written")
    factors = classes.cpu().numpy()
    mi, H = mutual_info_and_entropy(codes, factors)
    L = codes.shape[1]
    content_latents = list(range(L - content_dims, L))
    scores = {"mig": gap_score(mig_gaps(mi), H),
              "group_mig": gap_score(group_gaps(mi, content_latents, content_factors), H)}
    if "modularity" in metrics:
        scores["modularity"] = modularity_from_matrix(mi)
    if "sap" in metrics or "dci" in metrics:
        test = random_points(data, max(len(codes) // 2, 1), seed + 8)
        test_codes, test_factors = encode_means(vae, data, test), test.cpu().numpy()
        if "sap" in metrics:
            S = sap_matrix(codes, factors, test_codes, test_factors)
            scores |= {"sap": sap_from_matrix(S), "sap_matrix": S.tolist()}
        if "dci" in metrics:
            d = dci(codes, factors, test_codes, test_factors)
            scores |= {"dci_disentanglement": d["disentanglement"], "dci_completeness": d["completeness"],
                       "dci_informativeness": d["informativeness_test"],
                       "dci_informativeness_train": d["informativeness_train"],
                       "dci_importance": d["importance_matrix"].tolist()}
    if "factor_vae" in metrics:
        encode = lambda c: encode_means(vae, data, torch.as_tensor(c, device=data.device), progress=False)  # noqa
        scores["factor_vae_score"] = factor_vae_score(encode, data.factor_sizes, seed + 9, progress=lambda done, n:
                                                      _progress("FactorVAE score, encoding", done, n))["eval_accuracy"]
    scores |= {"mi_matrix": mi.tolist(), "factor_entropy": H.tolist(), "factor_names": list(data.factor_names),
               "content_factors": [data.factor_names[k] for k in content_factors], "content_latents": content_latents,
               "eval_samples": len(codes), "metrics": list(metrics),
               "eval_seconds": round(time.perf_counter() - t0, 3)}
    return scores, codes, factors


def parse_metrics(text):
    """--metrics: all, or a comma-separated list of METRICS' names -> those names, comma-separated, MIG and group-MIG
    first (always computed)."""
    names = list(METRICS) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown metric {', '.join(unknown)}; expected all, or some of "
                                         f"{', '.join(METRICS)} separated by commas")
    return ",".join(dict.fromkeys([*PAPER_METRICS, *names]))


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi):
    """Lay a figure out, write it as PNG atomically (never a 0-byte or half-written picture), then free it."""
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        _plt().close(fig)


def figure_title(m):
    """A run's identity in a figure's title: model (and what sets it apart), data set, beta, gamma, seed, steps."""
    return (f"{run_label(m)} on {m['dataset']}: beta {m['beta']:g}, gamma {m['gamma']:g}, seed {m['seed']}, "
            f"{m['steps']:,} steps")


def plot_mi_matrix(metrics, path):
    """Figure 3(a): I(z_i; v_k) / H(v_k), latent groups and factor groups marked, MIG and group-MIG in the title."""
    plt = _plt()
    mi, H = np.array(metrics["mi_matrix"]), np.array(metrics["factor_entropy"])
    norm = mi / np.where(H > 0, H, 1)
    names, content = metrics["factor_names"], set(metrics["content_factors"])
    order = [k for k, n in enumerate(names) if n not in content] + [k for k, n in enumerate(names) if n in content]
    L, n_s = norm.shape[0], metrics["content_latents"][0]
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2.5, 0.45 * L + 2))
    im = ax.imshow(norm[:, order], cmap="viridis", vmin=0, vmax=max(norm.max(), 1e-6), aspect="auto")
    for i in range(L):
        for j, k in enumerate(order):
            ax.text(j, i, f"{norm[i, k]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, k] < 0.6 * norm.max() else "black")
    n_nc = sum(n not in content for n in names)
    ax.axhline(n_s - 0.5, color="red", lw=2)
    ax.axvline(n_nc - 0.5, color="red", lw=2)
    ax.set_xticks(range(len(order)), [("c: " if names[k] in content else "\\c: ") + names[k] for k in order],
                  rotation=30, ha="right")
    ax.set_yticks(range(L), [f"z{i + 1} ({'c' if i >= n_s else chr(92) + 'c'})" for i in range(L)])
    ax.set_title(f"{figure_title(metrics)}\nnormalised MI I(z;v)/H(v):   MIG {metrics['mig']:.3f}   group-MIG "
                 f"{metrics['group_mig']:.3f}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    save_figure(fig, path, 110)


def tile(images, pad=2):
    """(R, C, ch, H, W) images in [0, 1] -> one (R*(H+pad)-pad, C*(W+pad)-pad, 3) numpy picture, white gaps."""
    R, C, ch, H, W = images.shape
    images = images.float().cpu().expand(R, C, 3, H, W) if ch == 1 else images.float().cpu()
    canvas = torch.ones(R, H + pad, C, W + pad, 3)
    canvas[:, :H, :, :W] = images.permute(0, 3, 1, 4, 2)
    return canvas.reshape(R * (H + pad), C * (W + pad), 3)[:-pad, :-pad].numpy()


def _image_figure(picture, path, row_labels, title, rows, cols, dpi=100):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(0.75 * cols + 1.2, 0.75 * rows + 0.6))
    ax.imshow(picture, interpolation="nearest")
    ax.set_yticks((np.arange(rows) + 0.5) * picture.shape[0] / rows, row_labels, fontsize=8)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    save_figure(fig, path, dpi)


@torch.no_grad()
def plot_reconstructions(run, path, title="", n_groups=8, seed=0):
    """Figure 5(a, c): each row one group of observations (left) and their reconstructions from the encoder
    means (right)."""
    a, data = run.args, run.data
    gen = torch.Generator(device=run.device).manual_seed(seed + 11)
    if a.pairs == "groups":
        classes, shares = sample_groups(data.factor_sizes, run.content_factors, n_groups, a.group_size, gen)
        labels = ["shares c" if s else "shares \\c" for s in shares.tolist()]
    else:
        classes, resampled = sample_k_factor_pairs(data.factor_sizes, n_groups, None if a.k == "rnd" else a.k,
                                                   a.pairs == "k_factors_exact", gen)
        labels = [f"{n} resampled" for n in resampled.sum(1).tolist()]
    x = data.images(classes.flatten(0, 1))
    run.vae.eval()
    rec = torch.sigmoid(run.vae.decode(run.vae.encode(x)[0]).float())
    run.vae.train()
    G = a.group_size
    both = torch.cat([x.view(n_groups, G, *x.shape[1:]), rec.view(n_groups, G, *x.shape[1:])], 1)
    _image_figure(tile(both), path, labels, f"{title}\n{G} observations of a group | their reconstructions",
                  n_groups, 2 * G)


@torch.no_grad()
def plot_traversals(run, codes, path, title="", n_steps=9, seed=0):
    """Figure 5(b, d): row i varies z_i alone from its 1st to its 99th percentile over the evaluated codes,
    the other dims held at one observation's code."""
    L = run.args.latent_dim
    lo, hi = np.percentile(codes, 1, axis=0), np.percentile(codes, 99, axis=0)
    z = torch.as_tensor(codes[seed % len(codes)], dtype=torch.float32, device=run.device).repeat(L, n_steps, 1)
    for i in range(L):
        z[i, :, i] = torch.linspace(float(lo[i]), float(hi[i]), n_steps, device=run.device)
    run.vae.eval()
    imgs = torch.sigmoid(run.vae.decode(z.view(-1, L)).float()).view(L, n_steps, run.data.channels, 64, 64)
    run.vae.train()
    n_s = L - run.args.content_dims
    labels = [f"z{i + 1} ({'c' if i >= n_s else chr(92) + 'c'})" for i in range(L)]
    _image_figure(tile(imgs), path, labels, f"{title}\ntraversals: row i varies z_i (1st to 99th percentile)",
                  L, n_steps)


def plot_training_curves(log_path, path, titles=None, title=""):
    """One panel per column of a log (log.csv's terms, scores.csv's scores) against the step (rows that are not
    whole, as a crash may leave, are left out)."""
    plt = _plt()
    rows = [r for r in read_log(log_path) if whole_row(r)]
    if not rows:
        return
    names = [n for n in rows[0] if n not in ("step", "ms_per_step")]
    steps = [int(r["step"]) for r in rows]
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names) + 0.6, 2.6), squeeze=False)
    for ax, n, panel in zip(axes[0], names, titles or names):
        ax.plot(steps, [float(r[n]) for r in rows], lw=1.2, marker=".", ms=4)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path, 90)


def evaluate_and_plot(run, out, n_samples):
    """Evaluate a Run into its folder: metrics.json (the scores and the run's settings) and the figures."""
    out, a = Path(out), run.args
    print(f"evaluating on {n_samples or run.data.num_points:,} points", file=sys.stderr)
    scores, codes, factors = evaluate(run.vae, run.data, run.content_factors, a.content_dims, n_samples, a.seed,
                                      a.metrics.split(","))
    got = {k: name for k, name in SCORES.items() if k in scores}
    if not all(math.isfinite(scores[k]) for k in got):
        raise UserError(f"the evaluation on {scores['eval_samples']:,} points gave "
                        + ", ".join(f"{name} {scores[k]}" for k, name in got.items())
                        + " (every factor took a single value there); nothing was written. "
                        f"Evaluate on more points: --eval-only --out {out} --eval-samples 10000")
    metrics = scores | {"model": a.model, "dataset": a.dataset, "steps": run.step,
                        "train_seconds": round(run.train_seconds, 3), "beta": a.beta, "gamma": a.gamma,
                        "group_size": a.group_size, "tc_level": a.tc_level, "pairs": a.pairs, "k": a.k, "seed": a.seed,
                        "batch_size": a.batch_size, "latent_dim": a.latent_dim, "content_dims": a.content_dims,
                        "torch_threads": run.threads, "machines": run.machines,
                        "factor_sizes": list(run.data.factor_sizes)}
    title = figure_title(metrics)
    plot_mi_matrix(metrics, out / "mi_matrix.png")
    plot_reconstructions(run, out / "reconstructions.png", title, seed=a.seed)
    plot_traversals(run, codes, out / "traversals.png", title, seed=a.seed)
    if (out / "log.csv").exists():
        plot_training_curves(out / "log.csv", out / "training_curves.png", title=title)
    if (out / "scores.csv").exists():
        plot_training_curves(out / "scores.csv", out / "scores.png", [SCORES[k] for k in PAPER_METRICS], title)

    def write_codes(tmp):  # any outside tool can score the run from these
        with open(tmp, "wb") as f:
            np.savez(f, codes=codes.astype(np.float32), factors=factors.astype(np.int64))
    write_atomic(out / "codes.npz", write_codes)
    # last: a run is finished once its metrics.json stands at its steps, so its figures are there by then
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=1, allow_nan=False) + "\n")
    print("  ".join(f"{name} {scores[k]:.4f}" for k, name in got.items()) + f"  -> {out}/metrics.json",
          file=sys.stderr)
    return metrics




# ----------------------------------------------------------------------------------------------------------------
# Summary of a grid of runs: results.md, Figures 4, 3(b), 3(c), and the scores over training.
# ----------------------------------------------------------------------------------------------------------------
# Driven by MODELS and SCORES: a model or a score they do not list is shown plainly, never an error.
def _legend(ax):
    if ax.get_legend_handles_labels()[0]:  # an empty legend is a matplotlib warning
        ax.legend(fontsize=8)


def _density(values, grid):
    """Gaussian kernel density with Scott's bandwidth (a floor keeps one-valued sets visible)."""
    values = np.asarray(values, float)
    bw = max(1.06 * values.std() * len(values) ** -0.2, 0.01)
    return np.exp(-0.5 * ((grid[:, None] - values[None]) / bw) ** 2).sum(1) / (len(values) * bw * np.sqrt(2 * np.pi))


def _color(model):
    return MODELS[model].color if model in MODELS else "tab:gray"


def _model_order(model):
    return (list(MODELS).index(model) if model in MODELS else len(MODELS), model)


def run_label(m):
    """How a run is named in the table: its model, plus what sets it apart from the paper's main grid (m: a
    metrics.json, or a config.json's flags)."""
    label = m["model"]
    latent, content = _dims(m)
    default, chosen = DEFAULT_CONTENT.get(m["dataset"]), content_names(m)
    official, sizes = DATASET_SIZES.get(m["dataset"]), tuple(m.get("factor_sizes") or ())  # a sub-grid file's
    tc = m.get("tc_level", "inter")
    for what, differs in ((f"group size {m.get('group_size')}", m.get("group_size", 2) != 2),
                          (f"TC {tc}", m["model"] == "group_tcvae" and tc != "inter"),
                          (f"{m.get('pairs')}, k {m.get('k', 'rnd')}", m.get("pairs", "groups") != "groups"),
                          (f"batch {m.get('batch_size')}", m.get("batch_size", 32) != DEFAULTS["batch_size"]),
                          (f"z {latent}, z_c {content}",
                           (latent, content) != (DEFAULTS["latent_dim"], DEFAULTS["content_dims"])),
                          (f"content {','.join(chosen)}", default is not None and chosen != default),
                          (f"factor sizes {','.join(map(str, sizes))}", bool(sizes) and sizes != official)):
        label += f" ({what})" if differs else ""
    return label


def _dims(m):
    """(latent dims, content dims) of a metrics.json (earlier ones: from the MI matrix) or a config's flags."""
    if "latent_dim" in m:
        return m["latent_dim"], m["content_dims"]
    return len(m["mi_matrix"]), len(m["content_latents"])


def setting(m):
    """What one row of the summary pools: every run-defining flag but the seed, and the steps."""
    return run_label(m), m["beta"], m["gamma"], m["steps"]


def load_runs(runs_dir):
    """Every run under runs_dir evaluated at its steps: its metrics.json, if it has the structure evaluate() writes
    (others are skipped, with a line that says why); one run found in two folders is counted once, and runs not
    evaluated at their --steps are left out, with a line each.
    -> (runs, unfinished: the flags of the runs left out)."""
    runs, unfinished, seen = [], [], {}
    for folder in [Path(runs_dir)] if is_run(runs_dir) else runs_below(runs_dir):
        path, config = folder / "metrics.json", folder / "config.json"
        try:
            flags = DEFAULTS | json.loads(config.read_text()) if config.is_file() else None
        except (OSError, ValueError, TypeError):
            flags = None
        if not path.exists():
            if isinstance(flags, dict) and {"model", "dataset", "beta", "gamma", "steps"} <= set(flags):
                print(f"leaving out {folder}: not evaluated yet (no metrics.json)", file=sys.stderr)
                unfinished.append(flags | {"path": str(folder)})
            continue
        try:
            m = json.loads(path.read_text())
            mi = np.array(m["mi_matrix"], float)
            K = len(m["factor_names"])
            if not (mi.ndim == 2 and mi.shape[1] == K == len(m["factor_entropy"])
                    and all(math.isfinite(m[k]) for k in SCORES if k in m)
                    and set(m["content_factors"]) <= set(m["factor_names"])
                    and all(0 <= i < len(mi) for i in m["content_latents"])
                    and (m.get("factor_sizes") is None or len(m["factor_sizes"]) == K
                         and all(type(n) is int and n > 0 for n in m["factor_sizes"]))):
                raise ValueError("its MI matrix, factors or scores do not agree")
            for key in ("model", "dataset", "beta", "gamma", "steps"):
                m[key]  # noqa: B018 (present, or KeyError)
            if not isinstance(m["steps"], int):
                raise ValueError(f"its steps is {m['steps']!r}, not a whole number")
        except (OSError, ValueError, KeyError, TypeError) as error:
            print(f"skipping {path}: not a metrics.json of this program ({type(error).__name__}: {error})",
                  file=sys.stderr)
            continue
        m["path"] = str(folder)
        if isinstance(flags, dict) and isinstance(flags.get("steps"), int) and m["steps"] < flags["steps"]:
            print(f"leaving out {folder}: evaluated at step {m['steps']:,} of its {flags['steps']:,}",
                  file=sys.stderr)
            unfinished.append(flags | {"path": str(folder)})
            continue
        key = (m["dataset"], setting(m), m.get("seed"))
        if key in seen:
            print(f"{folder} holds the same run as {seen[key]} (same settings, seed and steps): counted once",
                  file=sys.stderr)
            continue
        seen[key] = folder
        runs.append(m)
    return runs, unfinished


PER_FACTOR = {  # score -> (metrics.json -> its value per factor (K,), what the row means)
    "mig": (lambda m: _over_entropy(m, mig_gaps(np.array(m["mi_matrix"]))),
            "MIG: the gap between the two latents that know the factor best, over H(v); MIG is the mean of this row."),
    "group_mig": (lambda m: _over_entropy(m, group_gaps(np.array(m["mi_matrix"]), m["content_latents"],
                                                        [m["factor_names"].index(n) for n in m["content_factors"]])),
                  "group-MIG: best latent of the factor's own group minus the best of the other group, over H(v); "
                  "group-MIG is the mean of this row."),
    "sap": (lambda m: mig_gaps(np.array(m["sap_matrix"])),
            "SAP: the gap between the two latents whose linear SVM predicts the factor best; SAP is the mean of this "
            "row."),
    "dci_completeness": (lambda m: 1 - _entropy(np.array(m["dci_importance"]) + 1e-11, len(m["dci_importance"])),
                         "DCI completeness per factor: 1 - the entropy (base L) of its importance over the latents; "
                         "DCI completeness is their mean weighted by each factor's share of the importance."),
}


def _over_entropy(m, gaps):
    H = np.array(m["factor_entropy"])
    return gaps / np.where(H > 0, H, np.nan)  # NaN for one-valued factors


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


def _setting_order(key):
    """Rows of results.md in the models' order, then by label and settings."""
    return _model_order(key[0].split()[0]), key


def unfinished_line(unfinished, title):
    """One line of results.md: the unfinished runs (their flags), counted per setting."""
    waiting = collections.Counter(setting(u) for u in unfinished)
    return f"{title}: " + "; ".join(
        f"{label}, beta {beta:g}, gamma {gamma:g}, {steps:,} steps: {n} run{'s' * (n > 1)}"
        for (label, beta, gamma, steps), n in sorted(waiting.items(), key=lambda kv: _setting_order(kv[0]))) + "."


def results_table(rs, dataset, unfinished=()):
    """results.md's section for one data set: per model, per setting, each seed of every score, per factor. A row
    pools only runs that agree on every run-defining flag but the seed, and on their steps."""
    scores = [k for k in SCORES if any(k in m for m in rs)]
    labels = sorted({(run_label(m), m["steps"]) for m in rs}, key=_setting_order)
    columns = [(k, s, f) for k in scores for s, f in (("mean", np.mean), ("median", np.median), ("best", np.max))
               if k in PAPER_METRICS or s == "mean"]  # the paper's scores in full, the others' means
    lines = [f"## {dataset}", "", "| model | runs | steps | " + " | ".join(
        f"{SCORES[k]} {s}" for k, s, _ in columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    for label, steps in labels:
        group = [m for m in rs if (run_label(m), m["steps"]) == (label, steps)]
        lines.append(f"| {label} | {len(group)} | {steps:,} | " + " | ".join(
            _stat(group, k, f) for k, _, f in columns) + " |")
    head = "| model | beta | gamma | steps | "
    by_setting = {key: sorted([m for m in rs if setting(m) == key], key=lambda m: m.get("seed", 0))
                  for key in sorted({setting(m) for m in rs}, key=_setting_order)}
    lines += ["", "Per setting (mean over seeds):", "",
              head + "runs | " + " | ".join(f"{SCORES[k]} mean" for k in scores) + " |",
              "|---|---|---|---|---|" + "---|" * len(scores)]
    for (label, beta, gamma, steps), group in by_setting.items():
        lines.append(f"| {label} | {beta:g} | {gamma:g} | {steps:,} | {len(group)} | "
                     + " | ".join(_stat(group, k, np.mean) for k in scores) + " |")
    lines += ["", "Each seed (the seeds' scores in the order of the seeds column; - where a run lacks the score):", "",
              head + "seeds | " + " | ".join(SCORES[k] for k in scores) + " |",
              "|---|---|---|---|---|" + "---|" * len(scores)]
    for (label, beta, gamma, steps), group in by_setting.items():
        each = lambda k: ", ".join(f"{m[k]:.3f}" if k in m else "-" for m in group)  # noqa: E731
        lines.append(f"| {label} | {beta:g} | {gamma:g} | {steps:,} | "
                     + ", ".join(str(m.get("seed", "-")) for m in group) + " | "
                     + " | ".join(each(k) for k in scores) + " |")
    if unfinished:
        lines += ["", unfinished_line(unfinished, "Unfinished (not counted above)")]
    names = rs[0]["factor_names"]
    for score in (k for k in scores if k in PER_FACTOR):
        for split in sorted({content_names(m) for m in rs}):  # one table per content split: its columns' marks
            lines += ["", f"Per factor, mean over seeds (c: content factor, \\c: the others). {PER_FACTOR[score][1]}",
                      "",
                      "| model | beta | gamma | steps | " + " | ".join(("c: " if n in split else "\\c: ") + n
                                                                  for n in names) + " |",
                      "|---|---|---|---|" + "---|" * len(names)]
            for (label, beta, gamma, steps), group in by_setting.items():
                group = [m for m in group if score in m]
                if group and content_names(group[0]) == split:
                    gaps = np.nanmean([PER_FACTOR[score][0](m) for m in group], axis=0)
                    lines.append(f"| {label} | {beta:g} | {gamma:g} | {steps:,} | "
                                 + " | ".join(f"{g:.3f}" for g in gaps) + " |")
    return lines + [""]


def on_main_grid(m, any_group_size=False):
    """Whether a run is of the paper's main grid, as Figures 4 and 3(b) pool them (and 3(c), of any group size):
    its label names nothing but its model (run_label: the paper's group pairs, TC inter, the default batch size,
    dims and content factors, the official factor sizes)."""
    return run_label(m | {"group_size": 2} if any_group_size else m) == m["model"]


def figure_4(rs, dataset, path):
    """Figure 4: the density of each score per model over the paper's main grid (on_main_grid); points alone for a
    model with fewer than 3 runs."""
    main_runs = [m for m in rs if on_main_grid(m)]
    if not main_runs:
        return  # none of the paper's grid: no figure (the table has the runs)
    plt = _plt()
    scores = [k for k in sorted(SCORES, key=lambda k: k != "group_mig") if any(k in m for m in main_runs)]
    cols = min(max(len(scores), 1), 4)
    rows = -(-max(len(scores), 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(scores):]:
        ax.axis("off")
    left_out = len(rs) - len(main_runs)
    for ax, key in zip(axes.flat, scores):
        title = SCORES[key]
        values = [m[key] for m in main_runs if key in m]
        grid = np.linspace(min(values + [0.0]) - 0.05, max(values + [0.0]) + 0.05, 300)
        for model in sorted({m["model"] for m in main_runs}, key=_model_order):
            v = [m[key] for m in main_runs if m["model"] == model and key in m]
            if len(v) >= 3:
                ax.plot(grid, _density(v, grid), color=_color(model), label=f"{model} (n={len(v)})")
                ax.fill_between(grid, _density(v, grid), color=_color(model), alpha=0.15)
                ax.plot(v, np.zeros(len(v)), "|", color=_color(model), ms=12)
            elif v:
                ax.plot(v, np.zeros(len(v)), "o", color=_color(model), ms=6, label=f"{model} (n={len(v)}, points)")
        ax.set_title(f"{title}, {len(main_runs)} runs of the paper's grid ({dataset})\n(pairs, TC inter; every "
                     f"beta and gamma" + (f"; {left_out} other runs not shown)" if left_out else ")"), fontsize=9)
        ax.set_xlabel(f"{title} (higher is better)")
        _legend(ax)
    save_figure(fig, path, 110)


def figure_3b(rs, dataset, path):
    """Figure 3(b): group-MIG of the content and of the non-content factors, over the baselines' runs of pairs."""
    plt = _plt()
    main_runs = [m for m in rs if on_main_grid(m) and m["model"] in MODELS and MODELS[m["model"]].baseline]
    if not main_runs:
        return  # no baseline's runs of pairs: no figure (rather than an empty one)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    positions, ticks = 0, []
    for model in sorted({m["model"] for m in main_runs}, key=_model_order):
        parts = [split_group_mig(m) for m in main_runs if m["model"] == model]
        for j, name in enumerate(("content", "non-content")):
            v = [p[j] for p in parts]
            ax.boxplot([v], positions=[positions], widths=0.6)
            ax.plot(np.full(len(v), positions) + np.linspace(-0.15, 0.15, len(v)), v, "o", color=_color(model),
                    alpha=0.7, ms=4)
            ticks.append((positions, f"{model}\n{name}"))
            positions += 1
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks([t[0] for t in ticks], [t[1] for t in ticks], fontsize=8)
    ax.set_ylabel("group-MIG")
    betas = sorted({m["beta"] for m in main_runs})
    ax.set_title(f"Figure 3(b), {dataset}: group-MIG of content vs non-content\n(baselines' runs of pairs at "
                 f"beta {', '.join(f'{b:g}' for b in betas)})", fontsize=9)
    save_figure(fig, path, 110)


def figure_3c(rs, dataset, path):
    """Figure 3(c): the baselines' MIG against the number of observations sharing a group. The runs at larger
    groups use each model's first beta; its pairs are compared at the same beta(s)."""
    plt = _plt()
    base = [m for m in rs if m["model"] in MODELS and MODELS[m["model"]].baseline and "mig" in m
            and on_main_grid(m, any_group_size=True)]
    if not base:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    shown = set()
    for model in sorted({m["model"] for m in base}, key=_model_order):
        own = [m for m in base if m["model"] == model]
        betas = {m["beta"] for m in own if m.get("group_size", 2) != 2} or {m["beta"] for m in own}
        by_size = {}
        for m in own:
            if m["beta"] in betas:
                by_size.setdefault(m.get("group_size", 2), []).append(m["mig"])
        sizes = sorted(by_size)
        for s in sizes:
            ax.plot(np.full(len(by_size[s]), s), by_size[s], "o", color=_color(model), alpha=0.4, ms=4)
        ax.errorbar(sizes, [np.mean(by_size[s]) for s in sizes], [np.std(by_size[s]) for s in sizes],
                    color=_color(model), marker="s", capsize=3,
                    label=f"{model} (beta {', '.join(f'{b:g}' for b in sorted(betas))})")
        shown |= betas
    ax.set_xlabel("observations per group (--group-size)")
    ax.set_ylabel("MIG")
    ax.set_title(f"Figure 3(c), {dataset}: MIG vs group size\n(baselines' runs on group pairs, each at its first "
                 "beta)", fontsize=9)
    _legend(ax)
    save_figure(fig, path, 110)


def figure_scores(rs, dataset, path):
    """Scores over training (--eval-every): per setting, the mean over seeds (thick) and each seed (thin)."""
    logs = {m["path"]: read_log(Path(m["path"]) / "scores.csv") for m in rs
            if (Path(m["path"]) / "scores.csv").exists()}
    settings = sorted({setting(m) for m in rs if m["path"] in logs},
                      key=_setting_order)
    if not settings:
        return
    plt = _plt()
    fig, axes = plt.subplots(1, len(PAPER_METRICS), figsize=(5 * len(PAPER_METRICS), 3.8), squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes[0], ((k, SCORES[k]) for k in PAPER_METRICS)):
        for j, row in enumerate(settings):
            color = cycle[j % len(cycle)]
            curves = [{int(r["step"]): float(r[key]) for r in logs[m["path"]] if r.get(key)}
                      for m in rs if m["path"] in logs and setting(m) == row]
            for c in curves:
                ax.plot(sorted(c), [c[t] for t in sorted(c)], color=color, lw=0.6, alpha=0.5)
            common = sorted(set.intersection(*(set(c) for c in curves)))
            ax.plot(common, [np.mean([c[t] for c in curves]) for t in common], color=color, lw=2, marker=".",
                    label=f"{row[0]} beta {row[1]:g}" + (f" gamma {row[2]:g}" if row[2] else "")
                    + f" (n={len(curves)})")
        ax.set_title(f"{title} over training, {dataset}\n(per setting: mean over seeds; thin: each seed)", fontsize=9)
        ax.set_xlabel("step")
        _legend(ax)
    save_figure(fig, path, 110)


def summarize(runs_dir):
    """Figures 4, 3(b), 3(c) per data set and results.md, from every metrics.json under runs_dir."""
    runs_dir = Path(runs_dir)
    runs, unfinished = load_runs(runs_dir)
    if not runs:
        raise UserError(f"--summarize: no finished run under {runs_dir} (no metrics.json at its --steps); point it "
                        "at a folder of finished runs")
    lines = [f"# Results: {len(runs)} runs under {runs_dir}" + (f" ({len(unfinished)} more unfinished)"
                                                                  if unfinished else ""), "",
             "Scores as disentanglement_lib computes them, on encoder means (MIG: its discrete estimator, 20 bins; "
             "README: Metrics).", ""]
    for dataset in sorted({m["dataset"] for m in runs}):
        rs = [m for m in runs if m["dataset"] == dataset]
        lines += results_table(rs, dataset, [u for u in unfinished if u["dataset"] == dataset])
        for kind in ("figure4", "figure3b", "figure3c", "scores"):  # an earlier summary's: written anew, or none
            (runs_dir / f"{kind}_{dataset}.png").unlink(missing_ok=True)
        steps = max(m["steps"] for m in rs)  # a figure pools runs of one length: the longest
        if any(m["steps"] != steps for m in rs):
            print(f"{dataset}: the figures show the {sum(m['steps'] == steps for m in rs)} runs of {steps:,} steps, "
                  f"not the {sum(m['steps'] != steps for m in rs)} shorter ones (the table has them)", file=sys.stderr)
            rs = [m for m in rs if m["steps"] == steps]
        off = [m for m in rs if not on_main_grid(m)]
        if off:  # (Figure 3(c) draws the baselines' larger groups among them)
            print(f"{dataset}: Figures 4 and 3(b) leave out {len(off)} run{'s' * (len(off) > 1)} off the paper's main "
                  f"grid ({'; '.join(sorted({run_label(m) for m in off}))}); the table has them", file=sys.stderr)
        figure_4(rs, dataset, runs_dir / f"figure4_{dataset}.png")
        figure_3b(rs, dataset, runs_dir / f"figure3b_{dataset}.png")
        figure_3c(rs, dataset, runs_dir / f"figure3c_{dataset}.png")
        figure_scores(rs, dataset, runs_dir / f"scores_{dataset}.png")
    for dataset in sorted({u["dataset"] for u in unfinished} - {m["dataset"] for m in runs}):
        lines += [f"## {dataset}", "", unfinished_line([u for u in unfinished if u["dataset"] == dataset],
                                                       "No run finished yet. Unfinished"), ""]
    write_text_atomic(runs_dir / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote results.md and figures to {runs_dir}", file=sys.stderr)
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------
DEFAULTS = vars(build_parser().parse_args([]))  # the flags' defaults, by name


def main(argv=None):
    """Train, evaluate and plot one run or a sweep (or --eval-only / --summarize). Returns the exit status."""
    try:
        args = parse_args(argv)
        if args.summarize is not None:
            summarize(args.summarize)
            return 0
        members = expand(args)
        if args.eval_only and args.sweep:
            raise UserError(f"--eval-only evaluates one run: give --out one of the run folders under {args.out}")
        if args.eval_only and not (Path(args.out) / "checkpoint.pt").is_file():
            raise UserError(f"--eval-only: no checkpoint.pt in {args.out}; give --out the folder of a trained run")
        check_out_folder(args.out)
        if not args.sweep:
            check_run_folder(args.out)
        try:
            if args.sweep:
                if not getattr(args, "discovered", False):  # found runs: checked per set that trains together
                    check_memory(members)
                return train_sweep(args, members)
            with RunFolderLock(args.out):  # one process writes a run folder at a time
                if args.eval_only:
                    eval_only(members[0])
                    return 0
                checkpoint = prepare_run(members[0])
                if checkpoint is not False:
                    runs, _ = train(members, [checkpoint])
                    evaluate_and_plot(runs.runs[0], args.out, members[0].eval_samples)
            return 0
        except KeyboardInterrupt:
            print(f"\ninterrupted; the files in {args.out} are whole (each is written at once or not at all). "
                  f"Continue with --resume --out {args.out}, or evaluate with --eval-only --out {args.out}",
                  file=sys.stderr)
            return 130
        except OSError as error:  # the one place where a failed write or read becomes a message
            where = error.filename or args.out
            raise UserError(f"could not write or read {where}: {error.strerror or error}{_disk_note(where)}") from None
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # a script's background job (run_paper.sh's workers)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # starts with Ctrl-C ignored: take it back
    sys.exit(main())
