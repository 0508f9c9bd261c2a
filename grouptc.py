"""grouptc: weakly-supervised group disentanglement using total correlation (group-tcVAE), in one file.

Paper: L. Tran, S. Asgari Taghanaki, A. H. Khasahmadi, A. Sanghi, "Weakly-supervised group disentanglement using
total correlation" (Autodesk AI Lab). Baselines: MLVAE (Bouchacourt et al. 2018) and GVAE (Hosoya 2019), with the
conventions of disentanglement_lib (Locatello et al. 2020) wherever the paper is silent.

The models learn from groups of observations (pairs) that share every factor of one group of factors: the content
group c, or the rest \\c. The code splits the same way, z = (z_\\c, z_c). group-tcVAE adds to each observation's
ELBO a total correlation penalty between z_c and z_\\c (a discriminator D estimates it) and a KL term that pulls
the members' posteriors over the shared group's dims together.

One process trains one run:
    python grouptc.py --model group_tcvae --dataset dsprites               # the official file, downloaded if missing
    python grouptc.py --model group_tcvae --dataset dsprites_procedural    # built-in renderer, no download
    python grouptc.py --resume --out RUN                                   # continue a run from its checkpoint
    python grouptc.py --eval-only --out RUN --eval-samples 0               # re-evaluate a saved run on all points
Many runs are many processes (run_paper.sh); compare.py scores and summarises them.

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
    Fig. 3a  MI matrix ........................ plot_mi_matrix()
    Fig. 5   reconstructions, traversals ...... plot_reconstructions(), plot_traversals()

Sections: the method (group sampler -> model -> objectives -> metrics -> the training step), then the machinery
(a run -> run folders -> data sources -> arguments -> the training loop -> evaluation and figures -> command line).
"""

import argparse
import collections
import contextlib
import csv
import errno
import functools
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import sys
import textwrap
import time
import urllib.request
import zipfile
from pathlib import Path

try:
    import fcntl  # run-folder locks (POSIX); on other systems runs are not locked
except ImportError:  # pragma: no cover
    fcntl = None

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [  # the library: the method, the data sources, the metrics
    "sample_groups", "sample_k_factor_pairs", "VAE", "Discriminator", "reconstruction", "kl_to_prior", "gaussian_kl",
    "average_posterior", "product_posterior", "group_kl", "tc_blocks", "permute_codes", "tc_estimate",
    "discriminator_loss", "shared_dims", "adaptive_shared_dims", "group_objective", "train_step", "adam",
    "uniform_classes", "mutual_info_matrix", "mig", "group_mig", "load_dataset", "resolve_factors",
    "DSpritesProcedural", "Shapes3DProcedural", "ArrayData", "encode_means", "evaluate", "main", "MODELS",
    "DATASETS", "TC_LEVELS"]

TC_LEVELS = ("inter", "inter_intra", "full")

# THE METHOD =======================================================================================================
# The group sampler: groups of observations that share every factor of one group of factors. -----------------------
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


# Model: disentanglement_lib's conv encoder / deconv decoder (64x64 inputs), and the FactorVAE discriminator D. ----
# The latent z = (z_\c, z_c): z_\c the first latent_dim - content_dims dims, z_c the last content_dims (Fig. 3a).
class VAE(nn.Module):
    """The encoder q(z|x) and decoder p(x|z) of disentanglement_lib's conv VAE, for 64 x 64 images.
    encode: (N, channels, 64, 64) in [0, 1] -> mu, logvar, each (N, latent_dim).
    decode: (N, latent_dim) -> (N, channels, 64, 64) Bernoulli logits."""

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
        return self.encoder(x).chunk(2, dim=-1)

    def decode(self, z):
        return self.decoder(z)


class Discriminator(nn.Module):
    """FactorVAE's D: 6 hidden layers of 1000, LeakyReLU(0.2), 2 logits (0: joint q(z), 1: factorised q-bar(z)).
    forward: codes (N, latent_dim) -> logits (N, 2)."""

    def __init__(self, latent_dim=10, hidden=1000, layers=6):
        super().__init__()
        self.latent_dim = latent_dim
        sizes = [latent_dim] + [hidden] * layers
        blocks = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            blocks += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*blocks, nn.Linear(hidden, 2))

    def forward(self, z):
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"the discriminator takes codes (N, {self.latent_dim}), got {tuple(z.shape)}")
        return self.net(z)


# Objectives: one small function per quantity of the paper, assembled in group_objective(). ------------------------
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


def permute_codes(z, blocks, generator=None):
    """Samples of q-bar: each block of dims gets its own random permutation of the N codes (rows).
    z (N, L), blocks: L block ids in [0, L) (tc_blocks()) -> (N, L)."""
    perm = torch.rand(z.shape, generator=generator, device=z.device).argsort(0)  # (N, L): one per possible block
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


def check_objective_args(model, x, shares_content, D):
    """group_objective()'s arguments, checked before any computation: a clear ValueError, not a shape error."""
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


def group_objective(model, vae, D, x, shares_content, beta, gamma, content_dims, generator=None):
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
    generator: the source of the reparameterisation noise.
    Every term is per image: the paper's sums over the G members of a group are averaged instead, as
    disentanglement_lib's 0.5 * (rec1 + rec2) does, so beta and gamma keep their meaning for any G.

    group-tcVAE's loss, Eq. (3) read as a loss to minimise, per image x with code z = (z_\\c, z_c):
        rec(x) + KL(q(z|x) || p(z)) + beta * TC(z_c, z_\\c) + gamma * KL(q(z_S|x) || q(z_S|x'))
    with S the dims of the group x shares with the other members x' of its group (both directions, averaged)."""
    check_objective_args(model, x, shares_content, D)
    B, G = x.shape[:2]
    mu, logvar = (t.float().view(B, G, -1) for t in vae.encode(x.flatten(0, 1)))
    if not 0 < content_dims < mu.shape[-1]:
        raise ValueError(f"content_dims must be in 1..{mu.shape[-1] - 1} (both latent groups non-empty), got "
                         f"{content_dims}")
    adaptive = model in ADAPTIVE
    # (B, L): the dims of the group each group shares; the Ada models infer them from the pair
    shared = adaptive_shared_dims(mu, logvar) if adaptive else shared_dims(shares_content, mu.shape[-1], content_dims)
    if model != "group_tcvae":
        # Eq. (1): the shared dims take the group's aggregated posterior (both members the same); the others keep
        # their own.
        mu_g, logvar_g = (product_posterior if model in ("mlvae", "ada_mlvae") else average_posterior)(mu, logvar)
        mu, logvar = torch.where(shared[:, None], mu_g, mu), torch.where(shared[:, None], logvar_g, logvar)
    eps = torch.randn(mu.shape, generator=generator, device=mu.device)
    z = (mu + eps * (0.5 * logvar).exp()).flatten(0, 1)  # (B*G, L), reparameterised
    rec = reconstruction(vae.decode(z).float(), x.flatten(0, 1)).mean()
    kl = kl_to_prior(mu, logvar).sum(-1).mean()
    if adaptive:
        return rec + beta * kl, {"rec": rec, "kl": kl, "shared_dims": shared.float().sum(1).mean()}, z
    if model != "group_tcvae":
        return rec + beta * kl, {"rec": rec, "kl": kl}, z  # Eq. (1)
    # Eq. (3). NOTE: as printed, Eq. (3) subtracts (beta*TC - gamma*KL), which would REWARD a large KL between the
    # shared latents; the text says that term pulls them together, so it is added.
    with torch.autocast(z.device.type, enabled=False):
        tc = tc_estimate(D(z.float()))  # gradients reach the encoder; D's own parameters are frozen by the caller
    gkl = group_kl(mu, logvar, shared)
    return rec + kl + beta * tc + gamma * gkl, {"rec": rec, "kl": kl, "tc": tc, "group_kl": gkl}, z


# Metrics: disentanglement_lib's discrete MIG, and the paper's group-MIG, on the same plug-in MI estimator. --------
# The histogram MI is Numba-jitted (cached on disk, compiled once).
_mi_kernel = None


def _get_mi_kernel():
    """Compile (or load from Numba's cache) the Numba kernel of the joint histograms on first use: `import grouptc`
    stays fast."""
    global _mi_kernel
    if _mi_kernel is None:
        import numba

        @numba.njit(cache=True)
        def kernel(codes, edges, factors, n_classes):
            """codes (N, L) float64; edges (L, n_bins) left bin edges; factors (N, K) int64 in [0, n_classes).
            -> (L, K) plug-in MI in nats of digitize(codes[:, i], edges[i]) and factors[:, k]; (K,) entropies."""
            N, L = codes.shape
            K = factors.shape[1]
            n_bins = edges.shape[1]
            inverse_width = np.empty(L)
            for i in range(L):
                inverse_width[i] = (n_bins - 1) / (edges[i, n_bins - 1] - edges[i, 0]) if n_bins > 1 else 0.0
            joint = np.zeros((L, K, n_bins + 1, n_classes), np.int64)  # joint tables: bin label x class
            for n in range(N):
                for i in range(L):
                    x, e = codes[n, i], edges[i]
                    # numpy.digitize(x, e) = the number of left edges <= x, in 1..n_bins: guess it from the bin
                    # width, then step to the exact answer against the very edges numpy made.
                    b = min(max(int((x - e[0]) * inverse_width[i]) + 1, 1), n_bins)
                    while b < n_bins and x >= e[b]:
                        b += 1
                    while b > 1 and x < e[b - 1]:
                        b -= 1
                    for k in range(K):
                        joint[i, k, b, factors[n, k]] += 1
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

        _mi_kernel = kernel
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
    codes = np.ascontiguousarray(codes, dtype=np.float64)
    if codes.ndim != 2 or len(codes) != len(factors) or len(codes) == 0:
        raise ValueError(f"codes must be (N, L) with N = len(factors) = {len(factors)} > 0, got {codes.shape}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    if not np.isfinite(codes).all():
        raise ValueError(f"codes contain {codes.size - np.isfinite(codes).sum()} NaN or infinite values")
    labels, n_classes = _factor_labels(factors)
    # numpy.histogram's edges: linspace(min, max, n_bins + 1), widened by 0.5 on each side for a constant dim.
    lo, hi = codes.min(0), codes.max(0)
    flat = lo == hi
    lo, hi = np.where(flat, lo - 0.5, lo), np.where(flat, hi + 0.5, hi)
    edges = np.stack([np.linspace(a, b, n_bins + 1)[:-1] for a, b in zip(lo, hi)])  # (L, n_bins)
    return _get_mi_kernel()(codes, edges, labels, n_classes)


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


# The training step: the VAE's update with D frozen, then D's update on the detached codes. ------------------------
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


# THE MACHINERY: a run, run folders, data sources, arguments, the training loop, evaluation, figures ===============
# What the machinery knows of a model: its default beta and gamma, the terms train_step() returns for it (the
# columns of log.csv), its colour in compare.py's figures, and whether it is a baseline with an aggregated posterior
# (Figures 3b, 3c). A new model is an entry here and its branch in group_objective().
ModelSpec = collections.namedtuple("ModelSpec", "beta gamma terms color baseline")
MODELS = {
    # the paper's grid: beta {10..100}, gamma {1..64}
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


# A run: its networks, optimisers and generators, drawn from its --seed. -------------------------------------------
def adam(params, net, device, capturable=False):
    """The reference code's optimisers: the VAE's Adam(1e-4, (0.9, 0.999)), D's Adam(1e-4, (0.5, 0.9)); fused (and
    capturable, for the CUDA graph) on CUDA; on the CPU the default one (fused was no faster and rounds otherwise)."""
    fused = {"fused": True, "capturable": capturable} if device.type == "cuda" else {}
    betas = (0.9, 0.999) if net == "vae" else (0.5, 0.9)
    return torch.optim.Adam(params, lr=1e-4, betas=betas, eps=1e-8, **fused)


class Run:
    """One run: its flags (args), data, networks, optimisers, generators and the step it stands at. Everything it
    draws comes from its own two generators, seeded from --seed, so a seed reproduces the run."""

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
        # The torch thread counts and machines (machine()) it trained on, each change in order: the sums depend on them.
        self.threads, self.machines = [], []
        self.hyper = dict(model=args.model, beta=args.beta, gamma=args.gamma, content_dims=args.content_dims,
                          tc_level=args.tc_level, generator=self.model_gen, amp=device.type == "cuda")

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

    def images(self, classes):
        """(B, G, K) classes -> (B, G, C, 64, 64) images."""
        return self.data.images(classes.flatten(0, 1)).view(*classes.shape[:2], self.data.channels, 64, 64)

    def save(self, path, log_sum, log_count):
        """The run's checkpoint, tensors and plain types only (it loads with weights_only=True), written atomically."""
        weights = lambda m: {n: t.detach().clone() for n, t in m.state_dict().items()}  # noqa: E731 (not views)
        state = {"version": CHECKPOINT_VERSION, "step": self.step, "train_seconds": self.train_seconds,
                 "args": public_args(self.args), "vae": weights(self.vae), "vae_opt": self.vae_opt.state_dict(),
                 "D": weights(self.D) if self.D is not None else None,
                 "d_opt": self.d_opt.state_dict() if self.d_opt is not None else None,
                 "data_gen": self.data_gen.get_state(), "model_gen": self.model_gen.get_state(),
                 "log_sum": log_sum.clone(), "log_count": log_count, "torch_threads": self.threads,
                 "machines": self.machines, "factor_sizes": list(self.data.factor_sizes)}
        write_atomic(path, lambda tmp: torch.save(state, tmp))

    def load(self, c, path):
        """A checkpoint (load_checkpoint()) into this run: weights, optimisers, generators, step."""
        if tuple(c["factor_sizes"]) != self.data.factor_sizes:
            raise UserError(f"the checkpoint {path} was trained on data with factor sizes {tuple(c['factor_sizes'])}, "
                            f"but {self.data.name} here has {self.data.factor_sizes}: a run goes on with the data it "
                            "started on; point --data-dir at that file (or train anew in another --out)")

        def load_adam(opt, saved):  # the saved moments, copied out of the memory-mapped file, into this device's Adam
            own = opt.param_groups[0]  # (fused, capturable: as this device wants them)
            groups = [dict(g, **{k: own[k] for k in ("fused", "capturable", "foreach", "differentiable") if k in own})
                      for g in saved["param_groups"]]
            state = {i: {name: v.clone() for name, v in s.items()} for i, s in saved["state"].items()}
            opt.load_state_dict({"state": state, "param_groups": groups})
        try:
            self.vae.load_state_dict(c["vae"])
            load_adam(self.vae_opt, c["vae_opt"])
            if self.D is not None:
                self.D.load_state_dict(c["D"])
                load_adam(self.d_opt, c["d_opt"])
            try:
                self.data_gen.set_state(c["data_gen"])
                self.model_gen.set_state(c["model_gen"])
            except RuntimeError:  # saved on another kind of device: its generator states do not fit these
                if len(c["data_gen"]) == len(self.data_gen.get_state()):
                    raise UserError(f"the checkpoint {path} holds a damaged generator state; nothing was changed. "
                                    "Use an intact copy, or train the run anew") from None
                print(f"note: the checkpoint's generators belong to another device; continuing with generators "
                      f"seeded from --seed and step {c['step']}", file=sys.stderr)
                base = (self.args.seed * 1_000_003 + c["step"]) * 2 % 2 ** 63  # two roles, never one seed
                self.data_gen.manual_seed(base)
                self.model_gen.manual_seed(base + 1)
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as error:
            raise UserError(f"the checkpoint {path} does not fit the run its flags describe "
                            f"({type(error).__name__}: {(str(error).splitlines() or [''])[0]})") from None
        self.step, self.train_seconds = c["step"], float(c["train_seconds"])
        self.threads, self.machines = [int(n) for n in c["torch_threads"]], [str(m) for m in c["machines"]]


# Run folders: errors, atomic writes, locks, checkpoints, saved flags, logs, stops. --------------------------------
# Bad input is a UserError (one clear line from main(), never a traceback); every file is written whole or not at
# all; a run folder is held by one process at a time; checkpoints and configs are read back without running code.
class UserError(ValueError):
    """Bad input (a flag, a data file, a run folder): the message says what was wrong and what was expected."""
    exit_code = 2


class RunFolderBusy(UserError):
    """Another live process holds the run folder (run_paper.sh's workers leave such a run to it: exit status 3)."""
    exit_code = 3


class StopRun(Exception):
    """A stop (Ctrl-C, SIGTERM) honoured at a safe point; the message says what was kept and how to go on."""


def write_atomic(path, write):
    """write(tmp), then rename tmp onto path: a crash, a Ctrl-C or a full disk leaves the old file or the new one,
    never half of one nor a temporary file. An OSError goes on to main(), naming the file."""
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


def check_out_folder(out):
    """--out must be a folder (or not exist yet) under folders, its path UTF-8 text, and a run's files in it regular
    files: checked before any data or model is built."""
    out = Path(out)
    try:
        str(out).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"--out {str(out)!r}: the path holds bytes that are not UTF-8 text; choose a path of plain "
                        "characters") from None
    for p in (out, *out.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise UserError(f"--out {out}: {p} is a file, not a folder; choose another --out")
            break
    for name in ("config.json", "checkpoint.pt", "metrics.json", "log.csv", "scores.csv", "codes.npz"):
        p = out / name
        if p.is_symlink() or p.exists() and not p.is_file():
            raise UserError(f"{p} is not a regular file (a link, a folder, a pipe?); a run folder holds the files "
                            "this program wrote: move it away")
    return out


class RunFolderLock:
    """Holds a run folder for this process: an OS lock (flock) on RUN/.lock, which the OS drops when the process
    dies, however it dies. A second process gets a RunFolderBusy error naming the holder."""

    def __init__(self, out):
        self.out, self.fd = Path(out), None

    def __enter__(self):
        self.made = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.out / ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise UserError(f"{self.out / '.lock'} is a symbolic link; the lock must be a file of the run "
                                "folder's own: remove the link") from None
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
        os.pwrite(self.fd, f"process {os.getpid()} on {platform.node()}\n".encode(), 0)
        return self

    def __exit__(self, error_type, *exc):
        if error_type is not None and self.made and [p.name for p in self.out.iterdir()] == [".lock"]:
            shutil.rmtree(self.out, ignore_errors=True)  # refused before writing anything: leave nothing behind
        os.close(self.fd)  # closing the descriptor releases the lock; the file stays (removing it would race)


CHECKPOINT_VERSION = 2  # 2: one run a checkpoint, with its factor sizes and machines
CHECKPOINT_FIELDS = {  # every field of a checkpoint and what it must be
    "step": int, "train_seconds": (int, float), "args": dict, "vae": dict, "vae_opt": dict, "D": (dict, type(None)),
    "d_opt": (dict, type(None)), "data_gen": torch.Tensor, "model_gen": torch.Tensor, "log_sum": torch.Tensor,
    "log_count": int, "torch_threads": list, "machines": list, "factor_sizes": list}


def load_checkpoint(path):
    """A checkpoint, verified before use: the zip's CRCs (a damaged byte is refused, not trained or scored on), then
    torch.load(weights_only=True) (loading a file never runs code from it), then every field's type."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is not a regular file; a checkpoint is the checkpoint.pt this program wrote")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError) as error:
        raise UserError(f"could not read the checkpoint {path} ({error}); it is not a checkpoint this program "
                        "wrote") from None
    if damaged is not None:
        raise UserError(f"the checkpoint {path} is damaged (its record {damaged} fails its CRC check); nothing was "
                        "changed. Use an intact copy, or train the run anew")
    try:
        # On the CPU: generator states must stay CPU byte tensors; load_state_dict moves the rest to the device.
        c = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: read when used
    except Exception as error:
        raise UserError(f"could not read the checkpoint {path} ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''})") from None
    if not isinstance(c, dict):
        raise UserError(f"{path} is not a grouptc checkpoint (it holds a {type(c).__name__})")
    version = c.get("version")  # None: before formats were numbered; such a checkpoint is read if it is whole
    if "args" in c and "vae" in c and (version not in (None, CHECKPOINT_VERSION) or version is None and any(
            k not in c for k in CHECKPOINT_FIELDS)):
        written = version if version is not None else f"before {CHECKPOINT_VERSION}"
        raise UserError(f"{path} was written by another version of grouptc.py (checkpoint format {written}; this "
                        f"one reads format {CHECKPOINT_VERSION}); continue it with the version that wrote it")
    wrong = [k for k, kind in CHECKPOINT_FIELDS.items()
             if k not in c or not isinstance(c[k], kind) or isinstance(c[k], bool)]
    if not wrong:  # and within them: counts not negative, running sums a float vector, lists of their kind
        checks = {"step": c["step"] >= 0, "log_count": c["log_count"] >= 0,
                  "log_sum": c["log_sum"].dim() == 1 and c["log_sum"].is_floating_point(),
                  "torch_threads": all(type(n) is int for n in c["torch_threads"]),
                  "machines": all(isinstance(m, str) for m in c["machines"]),
                  "factor_sizes": all(type(n) is int and n > 0 for n in c["factor_sizes"])}
        wrong = [k for k, ok in checks.items() if not ok]
    if wrong:
        raise UserError(f"{path} is not a grouptc checkpoint (missing or wrong: {', '.join(wrong)})")
    return c


def read_flags(path, saved=None):
    """A run's saved flags (a checkpoint's args, else those of the config.json at `path`) -> {flag: value} of the
    flags this program knows, read by the parser that reads typed flags, so that they pass the same checks."""
    def refuse(message):
        raise UserError(f"{path} holds a flag this program refuses: {message}")
    if saved is None:
        try:
            if not path.is_file():
                raise OSError(f"{path} is not a regular file")
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"could not read {path} ({error}); it should be the config.json this program wrote") \
                from None
        if not isinstance(saved, dict) or "model" not in saved:
            raise UserError(f"{path} is not a grouptc config.json (expected an object of flags)")
    parser = build_parser(suppress_defaults=True, on_error=refuse)
    actions = {a.dest: a for a in parser._actions}
    argv = []
    for key, value in saved.items():
        if key not in actions or key in ("help", "resume", "eval_only", "out") or value is None:
            continue  # not a run's flag (or one of another version of this program): left out
        flag = actions[key].option_strings[0]
        if isinstance(actions[key], argparse._StoreTrueAction):
            if not isinstance(value, bool):
                refuse(f"{flag} must be true or false, got {value!r}")
            argv += [flag] * value
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            argv.append(f"{flag}={value}")
        else:
            refuse(f"{flag} must be a number or text, got {value!r}")
    return vars(parser.parse_args(argv))


def evaluated_at(out):
    """The step at which the run in `out` was last evaluated (its metrics.json), or None."""
    path = Path(out) / "metrics.json"
    try:
        steps = json.loads(path.read_text())["steps"] if path.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None


def open_run(args):
    """The run in args.out (held by this process) -> the checkpoint to start from (None: step 0), or False when it
    is finished (trained to --steps and evaluated there). Its checkpoint (else config.json) defines the run: a
    run-defining flag typed anew must agree, and so must --eval-samples when training goes on (scores.csv holds one
    set of points); the merged flags pass check_args()."""
    out = Path(args.out)
    ckpt_path, config_path = out / "checkpoint.pt", out / "config.json"
    saved = [p.name for p in (config_path, ckpt_path, out / "metrics.json") if p.exists()]
    if not (args.resume or args.eval_only):
        if saved:
            raise UserError(f"--out {out} already holds a run; pass --resume to continue it, or choose another --out")
        return None
    if not saved:
        raise UserError(f"--resume: {out} holds no saved run (no config.json or checkpoint.pt); start the run "
                        "without --resume")
    for orphan in out.glob(".*.tmp"):  # left by a process killed while writing (this process holds the folder)
        orphan.unlink(missing_ok=True)
    checkpoint = load_checkpoint(ckpt_path) if "checkpoint.pt" in saved else None
    if checkpoint is not None or "config.json" in saved:
        path = ckpt_path if checkpoint is not None else config_path
        flags = read_flags(path, checkpoint["args"] if checkpoint is not None else None)
        try:
            resolve_device(flags.get("device", "auto"))
        except UserError:  # a CUDA run continued where there is none, say
            if "device" not in args.given:
                print(f"{out} was run with --device {flags['device']}, which this machine lacks: using --device auto",
                      file=sys.stderr)
            flags["device"] = DEFAULTS["device"]
        kept = RUN_DEFINING if args.eval_only else RUN_DEFINING + ("eval_samples",)  # scores.csv: one set of points

        def same(key, typed, value):  # the default content factors typed out, or in another order, are the same
            if key == "content_factors":
                return content_names(flags | {key: typed}) == content_names(flags)
            return typed == value or key == "k" and flags.get("pairs", "groups") == "groups"  # k: unused on groups
        for key, value in flags.items():
            typed = getattr(args, key)
            if key not in args.given:
                setattr(args, key, value)
            elif key in kept and not same(key, typed, value):
                raise UserError(f"--{key.replace('_', '-')} {typed} differs from the run in {out} ({value}); leave "
                                "it out to keep the saved value, or use another --out")
        try:
            check_args(args)
        except UserError as error:
            try:  # whose flag is refused: one typed now (its message names it), or a saved one?
                check_args(argparse.Namespace(**(vars(args) | flags)))
            except UserError:
                raise UserError(f"{path} holds a flag this program refuses: {error}") from None
            raise
    if checkpoint is None and "metrics.json" in saved:  # a run's results without its checkpoint: an archive
        if "config.json" in saved and evaluated_at(out) == args.steps:
            print(f"{out} is finished ({args.steps:,} steps, evaluated); its checkpoint.pt is not there, so "
                  "nothing is left to do (--eval-only needs the checkpoint too)", file=sys.stderr)
            return False
        raise UserError(f"--resume: {out} holds a run's results (metrics.json) but no checkpoint.pt to continue it "
                        f"from{f' to {args.steps:,} steps' if 'config.json' in saved else ''}; put its checkpoint "
                        "back, or train it anew in another --out (here it would overwrite them)")
    if checkpoint is None:
        print(f"{out} has no checkpoint (its run stopped before the first one): restarting the run its config.json "
              "defines from step 0", file=sys.stderr)
        return None
    if config_path.exists() and run_name(argparse.Namespace(**(DEFAULTS | read_flags(config_path)))) != \
            run_name(args):  # the name holds every run-defining flag, exactly
        raise UserError(f"{config_path} and {ckpt_path} describe different runs; one of them was put there from "
                        "another run: move the folder out of the way")
    if args.eval_only:
        return checkpoint
    if checkpoint["log_sum"].shape != (len(MODELS[args.model].terms),):
        raise UserError(f"{ckpt_path} is not a checkpoint of the run in {out} (its running sums have shape "
                        f"{tuple(checkpoint['log_sum'].shape)}); move the folder away and train the run anew")
    if args.steps < checkpoint["step"]:
        raise UserError(f"--steps {args.steps} is below the {checkpoint['step']:,} steps the run in {out} has "
                        f"trained; give --steps {checkpoint['step']} or more (or leave it out)")
    if args.steps == checkpoint["step"] and evaluated_at(out) == args.steps:
        print(f"{out} is finished ({args.steps:,} steps, evaluated); nothing to do. --eval-only evaluates it "
              "again", file=sys.stderr)
        return False
    return checkpoint


def public_args(args):
    return {k: v for k, v in vars(args).items() if k != "given"}


class CsvLog:
    """A CSV file with a row per step, resumed at a checkpoint's step: the rows after it are dropped (and so is a
    row that a crash cut short), so that a resumed run's file equals an uninterrupted run's."""

    def __init__(self, path, columns, step):
        self.path = Path(path)
        rows = read_log(path) if self.path.is_file() and step > 0 else []
        rows = [[r[c] for c in columns] for r in rows if whole_row(r, columns) and int(r["step"]) <= step]
        self.last = int(rows[-1][0]) if rows else None  # the step of the last row kept

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([columns, *rows])
        write_atomic(self.path, write)

    def row(self, values):
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(values)


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
    """Ctrl-C / SIGTERM: the first asks the work to stop at its next safe point (training: after the current step,
    with a checkpoint); another, a second or more later, stops at once. (One stop can arrive twice within
    milliseconds: a batch system's cancel signals both the process and the script that runs it.)"""
    requested, at = False, 0.0

    def __call__(self, signum, frame):
        if not self.requested:
            self.requested, self.at = True, time.monotonic()
            print("\ninterrupt: stopping at the next safe point (again, a second or more later, to stop at once)",
                  file=sys.stderr)
        elif time.monotonic() - self.at > 1.0:  # not the same stop, twice
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self):
        """Handle SIGINT and SIGTERM with this object inside the block (main thread only)."""
        self.requested = False
        previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def check(self, what):
        if self.requested:
            raise StopRun(f"stopped during {what}")


STOP = StopRequest()  # requested only while main() has it installed


# Data sources: the official files (downloaded if missing) and the built-in renderers, factor classes -> images. ----
# A class tuple is flattened to the row of a data set by a mixed-radix index (last factor fastest), as both
# official files do.
DSPRITES_FACTORS = ("shape", "scale", "orientation", "posX", "posY")
DSPRITES_SIZES = (3, 6, 40, 32, 32)
# NOTE: the paper names its content split only for 3D Shapes (Sec. 4.1). For dSprites it gives none; this project
# takes what the sprite is (shape, scale, orientation) as content and where it is (posX, posY) as the rest, the
# split that mirrors 3D Shapes' object vs scene and gives both groups at least two factors.
DSPRITES_CONTENT = ("shape", "scale", "orientation")
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
MAX_SEED = 2 ** 31 - 1  # the CPU generator keeps a seed's low 32 bits; the model's is seed + 1,000,003

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
    """A data source: factor names and sizes, the default content factors (by name), and images(classes). A
    renderer draws a few hundred at a time (large batches of full-size images spill out of the CPU's caches)."""

    name, factor_names, factor_sizes, content_factors, channels, chunk = "base", (), (), (), 1, 512

    def __init__(self, device="cpu"):
        self.device = torch.device(device)

    @property
    def num_points(self):
        return int(np.prod(self.factor_sizes))

    def images(self, classes):
        """(B, K) LongTensor of factor classes -> (B, C, 64, 64) float tensor in [0, 1] on self.device."""
        classes = classes.to(self.device)
        if len(classes) <= self.chunk:
            return self.render(classes)
        return torch.cat([self.render(c) for c in classes.split(self.chunk)])


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


def download(file_name, data_dir, alternative):
    """Fetch an official file into data_dir: to a temporary name, checked against its published digest, then
    renamed into place. Any failure is a UserError that says where to put the file by hand."""
    url, algorithm, expected = DOWNLOADS[file_name]
    target = Path(data_dir) / file_name
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")  # this process's own: only it is removed
    help_text = (f"Download {url} yourself and put it at {target}, or use the built-in renderer "
                 f"'--dataset {alternative}' (no download needed).")
    digest = hashlib.new(algorithm)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"{file_name} not found in {data_dir}/; downloading {url}", file=sys.stderr)
        with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as out:
            total, done = int(response.headers.get("Content-Length") or 0), 0
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                digest.update(block)
                done += len(block)
                _progress(f"downloading {file_name}", done, total or done + 1)
        _progress(f"downloading {file_name}", 1, 1)
    except (OSError, ValueError) as error:
        partial.unlink(missing_ok=True)
        raise UserError(f"could not download {file_name} from {url} ({error}). {help_text}") from None
    if digest.hexdigest() != expected:
        partial.unlink(missing_ok=True)
        raise UserError(f"the download of {file_name} from {url} has {algorithm} {digest.hexdigest()}, expected "
                        f"{expected}; nothing was kept. {help_text}")
    os.replace(partial, target)
    return target


def _check(condition, path, what):
    if not condition:
        raise UserError(f"{path} is not in the official layout: {what}")


def load_official(name, data_dir, device, allow_subgrid=False):
    """dSprites or 3D Shapes from its official file in data_dir (downloaded if missing), checked against the official
    layout (row i: the image of flat index i) and, unless allow_subgrid, the official factor grid."""
    import h5py
    data_dir, dsprites = Path(data_dir), name == "dsprites"
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is a file; give the folder that holds (or will hold) the data files")
    files = (DSPRITES_NPZ, DSPRITES_HDF5) if dsprites else ("3dshapes.h5",)
    path = next((data_dir / n for n in files if (data_dir / n).exists()), None) or \
        download(files[0], data_dir, f"{name}_procedural")
    npz, t0 = path.suffix == ".npz", time.perf_counter()
    keys = ("imgs", "latents_classes") if npz else ("imgs", "latents/classes") if dsprites else ("images", "labels")
    try:
        with np.load(path) if npz else h5py.File(path, "r") as f:  # np.load: no allow_pickle, none needed
            _check(all(k in f for k in keys), path, f"expected {'keys' if npz else 'datasets'} {keys[0]!r} and "
                   f"{keys[1]!r}, found {sorted(f.keys())}")
            images, classes = f[keys[0]], f[keys[1]][()]  # an npz decompresses at every access: each read once
            n, shape = len(images), (64, 64) if dsprites else (64, 64, 3)
            _check(images.dtype == np.uint8 and images.shape[1:] == shape, path,
                   f"{keys[0]!r} should be uint8 (N, {', '.join(map(str, shape))}), got {images.dtype} {images.shape}")
            _check(classes.shape == (n, 6) and (np.issubdtype(classes.dtype, np.integer) or not dsprites), path,
                   f"{keys[1]!r} should be {'integer ' * dsprites}(N, 6) with N = {n}, got {classes.dtype} "
                   f"{classes.shape}")
            if not dsprites:  # 3D Shapes' labels are float factor VALUES; a value's class is its rank among them
                classes = np.stack([np.unique(classes[:, k], return_inverse=True)[1].reshape(-1) for k in range(6)], 1)
            _check(n > 0 and classes.min() >= 0, path, "factor classes must be non-negative")
            sizes = tuple(int(s) for s in classes.max(0) + 1)
            _check(math.prod(sizes) == n, path, f"{n} rows but factor sizes {sizes}")
            _check(np.array_equal(classes @ index_bases(sizes), np.arange(n)), path,
                   "rows are not ordered by factor classes (last factor fastest)")
            if dsprites:
                _check(sizes[0] == 1, path, f"the first factor (color) should have one value, has {sizes[0]}")
                sizes = sizes[1:]  # color dropped
            official = DSPRITES_SIZES if dsprites else SHAPES3D_SIZES
            if sizes != official and not allow_subgrid:
                raise UserError(f"{path} has factor sizes {sizes}, the official file {official}: it is not the data "
                                "set. Use the official file, or pass --allow-subgrid to train on a smaller file in "
                                "the official layout (a test file, say)")
            array = images  # an npz's, read already; an HDF5 file's, read whole in chunks (3D Shapes: 5.5 GiB)
            if not npz:
                array = np.empty(images.shape, np.uint8)
                for start in range(0, n, 10_000):
                    images.read_direct(array, np.s_[start:start + 10_000], np.s_[start:start + 10_000])
                    _progress(f"reading {path.name}", min(start + 10_000, n), n)
    except UserError:
        raise
    except Exception as error:  # a truncated zip, a broken HDF5 file, ...
        raise UserError(f"could not read {path} as a {'dSprites' if dsprites else '3D Shapes'} file "
                        f"({type(error).__name__}: {error}). Replace it with the official file, or use "
                        f"'--dataset {name}_procedural'.") from None
    top = int(array.max()) if dsprites else 0
    _check(top <= 1, path, f"dSprites pixels are 0 or 1, found values up to {top} (a 0/255 file?)")
    print(f"loaded {path} ({n:,} images) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return ArrayData(array, DSPRITES_FACTORS if dsprites else SHAPES3D_FACTORS, sizes,
                     DSPRITES_CONTENT if dsprites else SHAPES3D_CONTENT, name, device)


class DSpritesProcedural(GroupedData):
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


class Shapes3DProcedural(GroupedData):
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
    """The data set called `name` (one of DATASETS) on `device`; allow_subgrid: see load_official()."""
    if name in ("dsprites", "shapes3d"):
        return load_official(name, data_dir, device, allow_subgrid)
    if name in ("dsprites_procedural", "shapes3d_procedural"):
        return (DSpritesProcedural if name == "dsprites_procedural" else Shapes3DProcedural)(device)
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
            raise UserError(f"unknown factor '{f}'; expected names from {', '.join(factor_names)}")
    indices = tuple(sorted(set(indices)))
    if not indices or len(indices) == len(factor_names):
        raise UserError(f"content factors: both groups must be non-empty; got {list(factors)} out of "
                        f"{', '.join(factor_names)}")
    return indices


# Arguments: every hyperparameter in one place, with its meaning and paper default. --------------------------------
# The flags that define what a run is; a resumed or re-evaluated run keeps them from its folder.
RUN_DEFINING = ("model", "dataset", "batch_size", "group_size", "beta", "gamma", "tc_level", "content_factors",
                "latent_dim", "content_dims", "seed", "pairs", "k")
MOVED = {"--summarize": "python compare.py summarize RUNS_DIR",
         "--metrics": "python compare.py score RUN --metrics dci,sap,modularity,factor_vae"}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' only where X says something (not for None and switches)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:  # not `in (None, False)`: 0 == False
            return action.help
        return super()._get_help_string(action)


def build_parser(suppress_defaults=False, on_error=None):
    p = argparse.ArgumentParser(
        prog="grouptc.py", description="Trains one run of group-tcVAE, MLVAE, GVAE, Ada-GVAE or Ada-ML-VAE on "
        "groups of observations and scores it with MIG and group-MIG. Many runs: run_paper.sh; their comparison: "
        "compare.py.", formatter_class=_HelpFormatter)
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
    a("--k", type=_one(int, "k", "rnd"), default="rnd",
      help="k-factor pairs: the number of factors resampled, 1 .. (number of factors - 1), or rnd (drawn per pair)")
    a("--group-size", type=int, default=2, help="observations per group (paper: pairs)")
    a("--beta", type=_one(float, "beta"), default=None,
      help="group-tcVAE: weight of TC(z_c, z_\\c), paper grid {10,20,30,40,50,100}, default 10; the others: weight "
           "of the KL, Locatello's grid {1,2,4,6,8,16}, default 1")
    a("--gamma", type=_one(float, "gamma"), default=None,
      help="group-tcVAE: weight of the KL between the members' shared-group posteriors ('lambda' in the paper's "
           "grid {1,8,16,32,64}), default 8; unused by the others")
    a("--tc-level", choices=TC_LEVELS, default="inter",
      help="factorisation of q-bar (Sec. 3): inter: q(z_c)q(z_\\c), the paper's objective; inter_intra: q(z_c) "
           "prod_i q(z_\\c,i); full: prod_i q(z_i) (FactorVAE)")
    a("--content-factors", default=None,
      help="comma-separated factor names of the content group c (default: shapes3d object_hue,scale,shape, the "
           "paper's Sec. 4.1; dsprites shape,scale,orientation, this project's choice: the paper names no dSprites "
           "split)")
    a("--latent-dim", type=int, default=10, help="latent dims L")
    a("--content-dims", type=int, default=5, help="dims of z_c: the last ones of z (z_\\c are the first L - this)")
    a("--seed", type=_one(int, "seed"), default=0,
      help="seed of the data generator and of the model (init, noise, permutations)")
    a("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")
    a("--eager", action="store_true", default=False,
      help="on CUDA, run every step eagerly instead of replaying it as one captured CUDA graph (for debugging)")
    a("--out", default=None, help="run folder (default: runs/ and the run's name, which spells out its settings)")
    a("--eval-samples", type=int, default=10_000,
      help="points for MIG / group-MIG (disentanglement_lib: 10,000); 0: every point of the data set")
    a("--resume", action="store_true", default=False,
      help="continue the run in --out from its checkpoint.pt (its config.json defines the run; --steps may be raised)")
    a("--eval-only", action="store_true", default=False,
      help="no training: evaluate the checkpoint in --out again and rewrite metrics.json and the figures")
    a("--eval-every", type=int, default=0,
      help="steps between evaluations during training (MIG, group-MIG on the --eval-samples points of the final "
           "evaluation) into scores.csv and scores.png; 0: only the final evaluation")
    a("--checkpoint-every", type=int, default=5_000, help="steps between checkpoints")
    a("--log-every", type=int, default=None,
      help="steps between progress lines and log.csv rows (default: a tenth of --steps, at most 500)")
    return p


def _one(kind, flag, word=None):
    """argparse type of --seed, --beta, --gamma, --k: one value (a list is a grid of runs: run_paper.sh's), or
    `word` (--k's rnd)."""
    def parse(text):
        if text == word:
            return text
        if "," in text:
            raise argparse.ArgumentTypeError(f"a run has one {flag}, got '{text}'; for several runs, one process "
                                             f"each, use run_paper.sh")
        try:
            return kind(text)
        except ValueError:
            expected = f"a{'n' * (kind is int)} {kind.__name__}" + (f" or {word}" if word else "")
            raise argparse.ArgumentTypeError(f"expected {expected}, got '{text}'") from None
    parse.__name__ = kind.__name__
    return parse


def parse_args(argv=None):
    """The command line -> its flags (the model's beta and gamma, --log-every, --out filled in), and args.given: the
    flags the user typed."""
    argv = sys.argv[1:] if argv is None else list(argv)
    for word in argv:
        if word.split("=")[0] in MOVED:
            raise UserError(f"{word.split('=')[0]} is compare.py's now: {MOVED[word.split('=')[0]]}")

    def refuse(message):
        raise UserError(message)
    args = build_parser(on_error=refuse).parse_args(argv)
    args.given = set(vars(build_parser(suppress_defaults=True, on_error=refuse).parse_args(argv)))
    spec = MODELS[args.model]
    args.beta = spec.beta if args.beta is None else args.beta
    args.gamma = spec.gamma if args.gamma is None else args.gamma
    if args.log_every is None:
        args.log_every = max(1, min(500, args.steps // 10))
    if args.out is None:
        args.out = str(Path("runs") / run_name(args))
    return args


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
    runs share a name. Batch size, latent dims and content factors appear where they differ from the defaults; k
    only on k-factor pairs, where it means something."""
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


def check_args(args):
    """Every check of a run's flags (typed, or read back from a run folder), each message naming its flag."""
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
        raise UserError(f"--seed must be a whole number from 0 to {MAX_SEED:,} (the generators keep 32 bits), got "
                        f"{args.seed}")
    for flag in ("beta", "gamma"):
        if not 0 <= getattr(args, flag) <= float(np.finfo(np.float32).max):
            raise UserError(f"--{flag} must be a non-negative number a float32 holds (up to 3.4e38), got "
                            f"{getattr(args, flag)}")
    try:
        content_names(args)  # a misspelt content factor, refused before any folder is written
    except UserError as error:
        raise UserError(f"--content-factors: {error}") from None
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


def resolve_device(name):
    """--device -> a torch.device that this machine has; a clear error for a misspelt or missing one."""
    has = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(kind for kind, here in has.items() if here))
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in has:
        raise UserError(f"--device: unsupported device '{name}'; expected auto, cpu, cuda, cuda:N or mps")
    if not has[device.type]:
        raise UserError(f"--device {name}: {device.type.upper()} is not available on this machine; use --device cpu "
                        "or auto")
    return device


# The training loop: the step on the device; the host looks only when logging, evaluating or checkpointing. --------
def build_run(args, checkpoint=None, path=None):
    """The Run of these flags on its device, loaded from its checkpoint (None: step 0)."""
    device = resolve_device(args.device)
    data = load_dataset(args.dataset, args.data_dir, device, args.allow_subgrid)
    if all(size == 1 for size in data.factor_sizes):
        raise UserError(f"{data.name}'s factor grid is a single point (factor sizes {data.factor_sizes}): there is "
                        "nothing to learn or to score; use a file in which some factor takes several values")
    if args.eval_samples > data.num_points:
        raise UserError(f"--eval-samples {args.eval_samples:,} is more than the {data.num_points:,} points of "
                        f"{data.name}; give 0 (every point) or fewer")
    names = args.content_factors if args.content_factors is not None else data.content_factors
    run = Run(args, data, resolve_factors(names, list(data.factor_names)), device)
    if checkpoint is not None:
        run.load(checkpoint, path)
    return run


def check_memory(args):
    """A run's memory, estimated from its weights (with their gradients and Adam's two moments, float32) and its
    activations, against what the device has free: refused before anything is built when it cannot fit."""
    device = resolve_device(args.device)
    channels = 3 if args.dataset.startswith("shapes3d") else 1
    with torch.device("meta"):  # shapes only, no memory
        nets = [VAE(channels, args.latent_dim)] + [Discriminator(args.latent_dim)] * (args.model == "group_tcvae")
    need = 16 * sum(p.numel() for n in nets for p in n.parameters()) + \
        args.batch_size * args.group_size * 2 * 2 ** 20  # 2 MiB an image: a generous bound on a step's activations
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            free = 1024 * next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                               if line.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            return  # unknown here
    if need > free:
        raise UserError(f"this run needs about {need / 2 ** 20:,.0f} MiB and {device} has {free / 2 ** 20:,.0f} MiB "
                        "free; give a smaller --batch-size or --latent-dim")


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
    instruction set (torch and oneDNN pick their kernels by it; ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA cap them)
    and its maker, or the accelerator."""
    if device.type == "cpu":
        onednn = os.environ.get("ONEDNN_MAX_CPU_ISA")
        return (f"torch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()} ({cpu_vendor()})"
                + (f", oneDNN up to {onednn}" if onednn else ""))
    return f"torch {torch.__version__}, " + (torch.cuda.get_device_name(device) if device.type == "cuda" else
                                             device.type.upper())


def progress_line(step, total, names, means, ms):
    eta = int(ms * (total - step) / 1000)
    eta = f"{eta // 3600}h{eta % 3600 // 60:02d}m" if eta >= 3600 else f"{eta // 60}m{eta % 60:02d}s"
    return (f"step {step:>{len(str(total))}}/{total}  " + "  ".join(f"{n} {v:.4g}" for n, v in zip(names, means)) +
            f"  {ms:.1f} ms/step  ETA {eta}")


def train(args, checkpoint=None):
    """Train the run of `args` from `checkpoint` (open_run(); None: step 0) -> the Run at --steps. Writes config.json,
    log.csv, scores.csv (--eval-every), checkpoint.pt. A stop (STOP) ends it after the step, checkpointed: StopRun."""
    out, names = Path(args.out), MODELS[args.model].terms
    ckpt_path = out / "checkpoint.pt"
    run = build_run(args, checkpoint, ckpt_path)
    device = run.device
    log_sum, log_count = torch.zeros(len(names), device=device), 0
    if checkpoint is not None:
        log_sum, log_count = checkpoint["log_sum"].to(device), checkpoint["log_count"]
        print(f"resuming {out} at step {run.step:,}", file=sys.stderr)
    write_text_atomic(out / "config.json", json.dumps(public_args(args), indent=2) + "\n")
    log = CsvLog(out / "log.csv", ["step", *names, "ms_per_step"], run.step)
    scores = CsvLog(out / "scores.csv", ["step", *PAPER_SCORES], run.step) if args.eval_every else None
    # The CPU's sums depend on the thread count and the machine: each change is recorded, in order, and said.
    for saved, now in ((run.threads, torch.get_num_threads()), (run.machines, machine(device))):
        if saved and saved[-1] != now:
            print(f"note: {out} trained with {saved[-1]} and continues with {now} (threads or machine): the sums "
                  "depend on it, so from here on it is not the uninterrupted run", file=sys.stderr)
        if saved[-1:] != [now]:
            saved.append(now)

    def sampled_step():  # one step on a fresh batch -> its terms, stacked in `names` order
        classes, shares = run.sample()
        terms = train_step(run.vae, run.D, run.vae_opt, run.d_opt, run.images(classes), shares, **run.hyper)
        return torch.stack([terms[n] for n in names])
    graph = CudaGraphStep(sampled_step, [run.data_gen, run.model_gen], device) \
        if device.type == "cuda" and not args.eager else None

    print(f"training {args.model} on {run.data.name} ({device}): {args.steps:,} steps of {args.batch_size} groups "
          f"of {args.group_size}, beta {args.beta:g}" + (f", gamma {args.gamma:g}, TC level {args.tc_level}"
                                                          if args.model == "group_tcvae" else "")
          + (f", {args.pairs} pairs (k {args.k})" if args.pairs != "groups" else ""), file=sys.stderr)
    if scores is not None and run.step > 0 and run.step % args.eval_every == 0 and scores.last != run.step:
        score_row(run, scores, run.step)  # a stop came during this step's evaluation
    first, last_step, last_time = run.step + 1, run.step, time.perf_counter()
    while run.step < args.steps and not STOP.requested:
        if graph is None:  # the loop -> train_step() -> group_objective()
            classes, shares = run.sample()
            terms = train_step(run.vae, run.D, run.vae_opt, run.d_opt, run.images(classes), shares, **run.hyper)
            log_sum += torch.stack([terms[n] for n in names])
        else:  # the same step, replayed from its CUDA graph
            log_sum += graph()
        log_count += 1
        run.step += 1
        step = run.step
        at_log, at_ckpt = step % args.log_every == 0 or step == args.steps, step % args.checkpoint_every == 0
        at_eval = args.eval_every and step % args.eval_every == 0
        if not (at_log or at_ckpt or at_eval or step == first):
            continue
        means = (log_sum / max(log_count, 1)).tolist()  # the one host sync, every log / checkpoint / eval step
        now = time.perf_counter()
        run.train_seconds += now - last_time
        if not all(math.isfinite(v) for v in means):
            raise UserError(f"the loss became NaN or infinite between steps {last_step:,} and {step:,} "
                            f"({dict(zip(names, means))}); stopped. The last good checkpoint is kept at "
                            f"{ckpt_path if ckpt_path.exists() else '(none written yet)'}")
        ms = 1000 * (now - last_time) / max(step - last_step, 1)
        if at_log or step == first:  # the first step: a sign of life, well before the first --log-every
            print(progress_line(step, args.steps, names, means, ms)
                  + ("" if at_log else "  (first step: includes start-up)"), file=sys.stderr)
        if at_log:
            log.row([step, *[f"{v:.6g}" for v in means], f"{ms:.2f}"])
            log_sum, log_count = torch.zeros_like(log_sum), 0
        if at_ckpt or step == args.steps:
            run.save(ckpt_path, log_sum, log_count)
        if at_eval:  # scores over training, on the final evaluation's points (not counted as training)
            if not (at_ckpt or step == args.steps):
                run.save(ckpt_path, log_sum, log_count)  # a stop during the evaluation loses no training
            score_row(run, scores, step)
        last_step, last_time = step, time.perf_counter()
    run.train_seconds += time.perf_counter() - last_time
    if STOP.requested and run.step < args.steps:
        if not torch.isfinite(log_sum).all():  # gone NaN since the last look: the last good checkpoint stays
            raise UserError(f"stopped at step {run.step:,} with a NaN or infinite loss; the last good checkpoint is "
                            f"kept at {ckpt_path if ckpt_path.exists() else '(none written yet)'}")
        run.save(ckpt_path, log_sum, log_count)
        raise StopRun(f"stopped at step {run.step:,}; checkpoint written. Continue with: python grouptc.py --resume "
                      f"--out {out}")
    return run


def score_row(run, scores, step):
    """MIG and group-MIG at `step` into scores.csv."""
    a = run.args
    s = evaluate(run.vae, run.data, run.content_factors, a.content_dims, a.eval_samples, a.seed)[0]
    scores.row([step, *[f"{s[k]:.6g}" for k in PAPER_SCORES]])


# Evaluation and figures: the scores of a run, Figure 3(a), Figure 5, the training curves. -------------------------
@torch.no_grad()
def encode_means(vae, data, classes, batch=1024, progress=True):
    """(N, K) classes -> (N, L) encoder means as float64 numpy, encoded in batches on the data's device."""
    vae.eval()
    codes = []
    for i in range(0, len(classes), batch):
        codes.append(vae.encode(data.images(classes[i:i + batch]))[0].float().cpu())
        STOP.check("evaluation")
        if progress:
            _progress(f"encoding {len(classes):,} points", i + len(codes[-1]), len(classes))
    vae.train()
    return torch.cat(codes).double().numpy()


PAPER_SCORES = ("mig", "group_mig")  # what every evaluation scores (compare.py adds the field's other scores)
SCORES = {"mig": "MIG", "group_mig": "group-MIG"}  # their names in figures


def random_points(data, n_samples, seed):
    """(n_samples, K) uniform random factor classes of `data` from a generator of its own (0: every point)."""
    if n_samples == 0:
        return index_to_classes(torch.arange(data.num_points, device=data.device), data.factor_sizes)
    return uniform_classes(data.factor_sizes, (n_samples,),
                           torch.Generator(device=data.device).manual_seed(seed))


def evaluate(vae, data, content_factors, content_dims, n_samples=10_000, seed=0):
    """MIG and group-MIG of the encoder means of n_samples uniform random points of `data` (0: every point), as
    disentanglement_lib draws them (10,000); content_factors: indices; z_c: the last content_dims dims.
    -> (scores: MIG, group-MIG, the MI matrix and what they are over; codes (N, L); classes (N, K))."""
    t0 = time.perf_counter()
    classes = random_points(data, n_samples, seed + 7)
    codes = encode_means(vae, data, classes)
    if not np.isfinite(codes).all():
        raise UserError("the encoder gives NaN or infinite codes (its weights hold NaN or infinite values); nothing "
                        "was scored or written")
    factors = classes.cpu().numpy()
    mi, H = mutual_info_and_entropy(codes, factors)
    STOP.check("evaluation")
    L = codes.shape[1]
    content_latents = list(range(L - content_dims, L))
    scores = {"mig": gap_score(mig_gaps(mi), H),
              "group_mig": gap_score(group_gaps(mi, content_latents, content_factors), H),
              "mi_matrix": mi.tolist(), "factor_entropy": H.tolist(), "factor_names": list(data.factor_names),
              "content_factors": [data.factor_names[k] for k in content_factors], "content_latents": content_latents,
              "eval_samples": len(codes), "metrics": list(PAPER_SCORES),
              "eval_seconds": round(time.perf_counter() - t0, 3)}
    return scores, codes, factors


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def fit(title, width_inches, fontsize=9):
    """A title wrapped to the width of its figure (about 0.55 em a character), so that no line is cut off."""
    chars = max(int(width_inches * 72 / (0.55 * fontsize)), 20)
    return "\n".join(textwrap.fill(line, chars) for line in title.split("\n"))


def save_figure(fig, path, dpi):
    """Lay a figure out, write it as PNG atomically (never a 0-byte or half-written picture), then free it."""
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        _plt().close(fig)


def figure_title(m):
    """A run's identity in a figure's title: model, data set, beta, gamma, TC level, seed, steps."""
    tc = f", TC {m['tc_level']}" if m["model"] == "group_tcvae" else ""
    return (f"{m['model']} on {m['dataset']}: beta {m['beta']:g}, gamma {m['gamma']:g}{tc}, seed {m['seed']}, "
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
    ax.set_title(fit(f"{figure_title(metrics)}\nnormalised MI I(z;v)/H(v):   MIG {metrics['mig']:.3f}   group-MIG "
                     f"{metrics['group_mig']:.3f}", fig.get_figwidth() * 0.8), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    save_figure(fig, path, 110)


def plot_images(images, path, row_labels, title, pad=2):
    """(R, C, ch, H, W) images in [0, 1] drawn as one picture, R rows of C, white gaps between them."""
    R, C, ch, H, W = images.shape
    images = images.float().cpu().expand(R, C, 3, H, W) if ch == 1 else images.float().cpu()
    canvas = torch.ones(R, H + pad, C, W + pad, 3)
    canvas[:, :H, :, :W] = images.permute(0, 3, 1, 4, 2)
    picture = canvas.reshape(R * (H + pad), C * (W + pad), 3)[:-pad, :-pad].numpy()
    width = max(0.75 * C + 1.2, 4.5)
    title = fit(title, width - 1.2)
    fig, ax = _plt().subplots(figsize=(width, 0.75 * R + 0.45 + 0.17 * (title.count("\n") + 1)))
    ax.imshow(picture, interpolation="nearest")
    ax.set_yticks((np.arange(R) + 0.5) * picture.shape[0] / R, row_labels, fontsize=8)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    save_figure(fig, path, 100)


@torch.no_grad()
def plot_reconstructions(run, path, title="", n_groups=8, seed=0):
    """Figure 5(a, c): each row a group of observations (left), their reconstructions from the means (right)."""
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
    plot_images(both, path, labels, f"{title}\n{G} observations of a group | their reconstructions")


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
    plot_images(imgs, path, labels, f"{title}\ntraversals: row i varies z_i (1st to 99th percentile)")


def plot_training_curves(log_path, path, titles=None, title=""):
    """One panel per column of log.csv or scores.csv against the step (rows a crash cut short left out)."""
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
    fig.suptitle(fit(title, fig.get_figwidth()), fontsize=9)
    save_figure(fig, path, 90)


def evaluate_and_plot(run, out, n_samples):
    """Evaluate a Run into its folder: metrics.json (the scores and the run's settings) and the figures."""
    out, a = Path(out), run.args
    print(f"evaluating on {n_samples or run.data.num_points:,} points", file=sys.stderr)
    scores, codes, factors = evaluate(run.vae, run.data, run.content_factors, a.content_dims, n_samples, a.seed)
    if not all(math.isfinite(scores[k]) for k in SCORES):
        raise UserError(f"the evaluation on {scores['eval_samples']:,} points gave "
                        + ", ".join(f"{name} {scores[k]}" for k, name in SCORES.items())
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
        plot_training_curves(out / "scores.csv", out / "scores.png", [SCORES[k] for k in PAPER_SCORES], title)

    def write_codes(tmp):  # any outside tool can score the run from these
        with open(tmp, "wb") as f:
            np.savez(f, codes=codes.astype(np.float32), factors=factors.astype(np.int64))
    write_atomic(out / "codes.npz", write_codes)
    STOP.check("evaluation")
    # last: a run is finished once its metrics.json stands at its steps, so its figures are there by then
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=1, allow_nan=False) + "\n")
    print("  ".join(f"{name} {scores[k]:.4f}" for k, name in SCORES.items()) + f"  -> {out}/metrics.json",
          file=sys.stderr)
    return metrics


# Command line. ----------------------------------------------------------------------------------------------------
DEFAULTS = vars(build_parser().parse_args([]))  # the flags' defaults, by name


def main(argv=None):
    """Train, evaluate and plot one run (or --eval-only evaluate a saved one). Returns the exit status."""
    try:
        args = parse_args(argv)
        out = check_out_folder(args.out)
        if args.eval_only and not (out / "checkpoint.pt").is_file():
            raise UserError(f"--eval-only: no checkpoint.pt in {out}; give --out the folder of a trained run")
        if not (args.resume or args.eval_only):
            check_args(args)  # nothing saved: the typed flags alone define the run
        with RunFolderLock(out), STOP.installed():  # one process writes a run folder at a time
            try:
                if args.eval_only:
                    run = build_run(args, open_run(args), out / "checkpoint.pt")
                    evaluate_and_plot(run, out, args.eval_samples)
                elif (checkpoint := open_run(args)) is not False:
                    check_memory(args)
                    evaluate_and_plot(train(args, checkpoint), out, args.eval_samples)
            except (StopRun, KeyboardInterrupt) as stop:
                if isinstance(stop, StopRun) and str(stop).startswith("stopped at step"):
                    print(stop, file=sys.stderr)
                elif (out / "checkpoint.pt").exists() or (out / "config.json").exists():
                    print(f"\ninterrupted; the files in {out} are whole (each is written at once or not at all). "
                          f"Continue with: python grouptc.py {'--eval-only' if args.eval_only else '--resume'} "
                          f"--out {out}", file=sys.stderr)
                else:
                    print(f"\ninterrupted before the run's first checkpoint; nothing to continue in {out}: run the "
                          "same command again to start it", file=sys.stderr)
                return 130
            except OSError as error:  # the one place where a failed write or read becomes a message
                where, note = Path(error.filename or out), ""
                with contextlib.suppress(OSError):
                    free = shutil.disk_usage(where.parent).free / 2 ** 20
                    note = f" (the disk holding {where.parent} has {free:,.0f} MiB free)"
                raise UserError(f"could not write or read {where}: {error.strerror or error}{note}") from None
        return 130 if STOP.requested else 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # a script's background job (run_paper.sh's workers)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # starts with Ctrl-C ignored: take it back
    sys.exit(main())
