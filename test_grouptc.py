"""Tests for grouptc.py: oracles for every pure function, tiny files in the official layouts, smoke runs of the
CLI. Run: python -m pytest -q test_grouptc.py"""

import argparse
import collections
import contextlib
import errno
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

import grouptc as gt

HERE = Path(__file__).resolve().parent
REAL_FRAMES = HERE / "fixtures" / "dsprites_real_frames.npz"  # 202 real dSprites frames and their classes


# ------------------------------------------------------------------------------------------------ data: layouts
def test_index_round_trip():
    sizes = gt.DSPRITES_SIZES
    index = torch.arange(0, int(np.prod(sizes)), 997)
    classes = gt.index_to_classes(index, sizes)
    assert torch.equal(gt.classes_to_index(classes, sizes), index)
    # data.md: index 1 = (0,0,0,0,1), index 32 = (0,0,0,1,0), last = sizes - 1
    assert gt.index_to_classes(torch.tensor(1), sizes).tolist() == [0, 0, 0, 0, 1]
    assert gt.index_to_classes(torch.tensor(32), sizes).tolist() == [0, 0, 0, 1, 0]
    assert gt.index_to_classes(torch.tensor(737279), sizes).tolist() == [2, 5, 39, 31, 31]
    assert gt.index_bases((1, 3, 6, 40, 32, 32)).tolist() == [737280, 245760, 40960, 1024, 32, 1]
    assert gt.index_bases(gt.SHAPES3D_SIZES).tolist() == [48000, 4800, 480, 60, 15, 1]


TINY_DSPRITES = (1, 3, 2, 2, 3, 2)  # color, shape, scale, orientation, posX, posY: 72 images


def tiny_dsprites_arrays(seed=0, sizes=TINY_DSPRITES):
    rng = np.random.default_rng(seed)
    n = int(np.prod(sizes))
    classes = np.stack(np.unravel_index(np.arange(n), sizes), 1).astype(np.int64)
    imgs = rng.integers(0, 2, (n, 64, 64), dtype=np.uint8)
    return imgs, classes


def write_dsprites_npz(path, imgs, classes):
    metadata = {"latents_sizes": classes.max(0) + 1, "latents_names": ("color", "shape", "scale",
                                                                            "orientation", "posX", "posY")}
    np.savez_compressed(path, imgs=imgs, latents_classes=classes, latents_values=classes.astype(np.float64),
                        metadata=np.array(metadata, dtype=object))


def write_dsprites_hdf5(path, imgs, classes):
    with h5py.File(path, "w") as f:
        f.create_dataset("imgs", data=imgs, chunks=(1, 64, 64), compression="gzip")
        f.create_dataset("latents/classes", data=classes)
        f.create_dataset("latents/values", data=classes.astype(np.float64))


@pytest.mark.parametrize("container", ["npz", "hdf5"])
def test_dsprites_file_gives_the_image_at_the_flat_index(tmp_path, container):
    imgs, classes = tiny_dsprites_arrays()
    if container == "npz":
        write_dsprites_npz(tmp_path / gt.DSPRITES_NPZ, imgs, classes)
    else:
        write_dsprites_hdf5(tmp_path / gt.DSPRITES_HDF5, imgs, classes)
    data = gt.load_dataset("dsprites", tmp_path, allow_subgrid=True)
    assert data.factor_names == gt.DSPRITES_FACTORS and data.factor_sizes == TINY_DSPRITES[1:]
    assert data.content_factors == ("shape", "scale", "orientation")
    query = torch.tensor([[0, 0, 0, 0, 0], [2, 1, 1, 2, 1], [1, 0, 1, 1, 0]])
    x = data.images(query)
    assert x.shape == (3, 1, 64, 64) and x.dtype == torch.float32
    for q, img in zip(query, x):
        flat = int(np.flatnonzero((classes[:, 1:] == q.numpy()).all(1))[0])
        assert np.array_equal(img[0].numpy(), imgs[flat].astype(np.float32))


def test_shapes3d_file_gives_the_image_at_the_flat_index(tmp_path):
    sizes = (2, 2, 3, 2, 2, 3)
    n = int(np.prod(sizes))
    values = [np.linspace(0, 0.9, 10)[:2], np.linspace(0, 0.9, 10)[:2], np.linspace(0, 0.9, 10)[:3],
              np.linspace(0.75, 1.25, 8)[:2], np.arange(2.0), np.linspace(-30, 30, 15)[:3]]
    classes = np.stack(np.unravel_index(np.arange(n), sizes), 1)
    labels = np.stack([values[k][classes[:, k]] for k in range(6)], 1)
    images = np.random.default_rng(1).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    with h5py.File(tmp_path / "3dshapes.h5", "w") as f:
        f.create_dataset("images", data=images, chunks=(1, 64, 64, 3), compression="gzip")
        f.create_dataset("labels", data=labels)
    data = gt.load_dataset("shapes3d", tmp_path, allow_subgrid=True)
    assert data.factor_sizes == sizes and data.channels == 3
    query = torch.tensor([[1, 0, 2, 1, 0, 2], [0, 1, 1, 0, 1, 0]])
    x = data.images(query)
    assert x.shape == (2, 3, 64, 64)
    for q, img in zip(query, x):
        flat = int((q.numpy() * gt.index_bases(sizes)).sum())
        assert np.allclose(img.permute(1, 2, 0).numpy(), images[flat] / 255.0)


def test_missing_file_without_network_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(gt.DOWNLOADS, gt.DSPRITES_NPZ, ("http://127.0.0.1:9/nothing.npz", "md5", "0" * 32))
    with pytest.raises(gt.UserError) as error:
        gt.load_dataset("dsprites", tmp_path / "data")
    message = str(error.value)
    for part in (gt.DSPRITES_NPZ, "http://127.0.0.1:9/nothing.npz", str(tmp_path / "data"), "dsprites_procedural"):
        assert part in message
    assert list((tmp_path / "data").iterdir()) == []  # no partial file left behind


def test_download_checks_the_digest_then_renames(tmp_path, monkeypatch):
    source = tmp_path / "served.npz"
    imgs, classes = tiny_dsprites_arrays()
    write_dsprites_npz(source, imgs, classes)
    digest = hashlib.md5(source.read_bytes()).hexdigest()
    monkeypatch.setitem(gt.DOWNLOADS, gt.DSPRITES_NPZ, (source.as_uri(), "md5", "f" * 32))
    with pytest.raises(gt.UserError, match="expected f{32}"):
        gt.load_dataset("dsprites", tmp_path / "bad")
    assert list((tmp_path / "bad").iterdir()) == []
    monkeypatch.setitem(gt.DOWNLOADS, gt.DSPRITES_NPZ, (source.as_uri(), "md5", digest))
    data = gt.load_dataset("dsprites", tmp_path / "good", allow_subgrid=True)
    assert (tmp_path / "good" / gt.DSPRITES_NPZ).read_bytes() == source.read_bytes()
    assert data.factor_sizes == TINY_DSPRITES[1:]


def test_corrupt_and_wrong_files_get_a_message_and_are_kept(tmp_path):
    path = tmp_path / gt.DSPRITES_NPZ
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(gt.UserError, match=re.escape(str(path))):
        gt.load_dataset("dsprites", tmp_path)
    assert path.read_bytes() == b"not a zip file at all"  # never deleted or changed
    imgs, classes = tiny_dsprites_arrays()
    np.savez(path, images=imgs, latents_classes=classes)  # wrong key
    with pytest.raises(gt.UserError, match="expected keys 'imgs'"):
        gt.load_dataset("dsprites", tmp_path, allow_subgrid=True)
    np.savez(path, imgs=imgs.astype(np.float32), latents_classes=classes)  # wrong dtype
    with pytest.raises(gt.UserError, match="uint8"):
        gt.load_dataset("dsprites", tmp_path, allow_subgrid=True)
    np.savez(path, imgs=imgs, latents_classes=classes[::-1].copy())  # rows out of order
    with pytest.raises(gt.UserError, match="not ordered"):
        gt.load_dataset("dsprites", tmp_path, allow_subgrid=True)
    (tmp_path / "3dshapes.h5").write_bytes(b"\x89HDF broken")
    with pytest.raises(gt.UserError, match="3dshapes.h5"):
        gt.load_dataset("shapes3d", tmp_path)


def test_cli_reports_a_missing_file_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(gt.DOWNLOADS, gt.DSPRITES_NPZ, ("http://127.0.0.1:9/x.npz", "md5", "0" * 32))
    code = gt.main(["--dataset", "dsprites", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "error: could not download" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ renderers
def test_dsprites_renderer_matches_real_frames():
    real = np.load(REAL_FRAMES)
    x = gt.DSpritesProcedural().images(torch.from_numpy(real["classes"]))[:, 0].bool().numpy()
    target = real["imgs"].astype(bool)
    iou = (x & target).sum((1, 2)) / (x | target).sum((1, 2))
    shape = real["classes"][:, 0]
    assert iou[shape == 0].mean() > 0.998  # square (data.md: about 0.9995)
    assert iou[shape == 1].mean() > 0.994  # ellipse (about 0.997)
    assert iou[shape == 2].mean() > 0.955  # heart (about 0.963)
    assert x[:, :3].sum() == 0 and x[:, 61:].sum() == 0  # the grid stays within rows 3..60


def full_frame_dsprites(classes):
    """The renderer's geometry at every pixel centre of the 64 x 64 frame: the slow, obvious version."""
    d = gt.DSpritesProcedural()
    shape, s = classes[:, 0, None, None], d.scales[classes[:, 1]][:, None, None]
    theta = d.angles[classes[:, 2]][:, None, None]
    cx, cy = (16 + 32 * d.positions[classes[:, k]][:, None, None] for k in (3, 4))
    centres = torch.arange(64, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    dx, dy = x - cx, y - cy
    u = (torch.cos(theta) * dx - torch.sin(theta) * dy) / s
    v = (torch.sin(theta) * dx + torch.cos(theta) * dy) / s
    square, ellipse = (u.abs() <= 9.6) & (v.abs() <= 9.6), (u / 12.75) ** 2 + (v / 7.25) ** 2 <= 1
    heart = torch.zeros_like(square)
    for ux, vy in d.HEART_DISCS:
        heart |= (u - ux) ** 2 + (v - vy) ** 2 <= 25.0
    p, q, inside = d.polygon, d.polygon.roll(-1, 0), torch.ones_like(square)
    for k in range(len(p)):
        inside &= (q[k, 0] - p[k, 0]) * (v - p[k, 1]) - (q[k, 1] - p[k, 1]) * (u - p[k, 0]) >= 0
    return torch.where(shape == 0, square, torch.where(shape == 1, ellipse, heart | inside)).float()[:, None]


def test_dsprites_renderer_equals_the_full_frame_geometry():
    """Drawn in a window around each sprite, the images are those of the geometry at every pixel: random points,
    and every shape and orientation at the largest scale at the grid's edges and at the positions that sit furthest
    off their window's centre (15 and 16: 32 * k / 31 is 0.48 from a whole pixel)."""
    g = torch.Generator().manual_seed(2)
    positions = torch.tensor([0, 15, 16, 31])
    edges = torch.cartesian_prod(torch.arange(3), torch.tensor([5]), torch.arange(40), positions, positions)
    classes = torch.cat([gt.uniform_classes(gt.DSPRITES_SIZES, (3000,), g), edges])
    assert torch.equal(gt.DSpritesProcedural().images(classes), full_frame_dsprites(classes))


@pytest.mark.parametrize("renderer", [gt.DSpritesProcedural, gt.Shapes3DProcedural])
def test_renderer_is_deterministic_and_every_factor_changes_the_image(renderer):
    data = renderer()
    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor(data.factor_sizes)
    base = (torch.rand(40, len(sizes), generator=g) * sizes).long()
    x = data.images(base)
    assert x.shape == (40, data.channels, 64, 64) and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, data.images(base.clone()))
    for k, size in enumerate(data.factor_sizes):
        moved = base.clone()
        moved[:, k] = (base[:, k] + 1) % size  # the neighbouring value (39 -> 0 is 2*pi -> 0: same sprite)
        changed = (data.images(moved) != x).flatten(1).any(1)
        same_angle = (k == 2) & (base[:, k] == size - 1) if renderer is gt.DSpritesProcedural else False
        assert changed[~torch.as_tensor(same_angle)].all(), f"factor {data.factor_names[k]} left an image unchanged"


# ------------------------------------------------------------------------------------------------ sampler
@pytest.mark.parametrize("group_size", [2, 3, 5])
def test_sampler_shares_one_group_and_redraws_the_rest(group_size):
    sizes, content = gt.DSPRITES_SIZES, (0, 1, 2)
    g = torch.Generator().manual_seed(3)
    classes, shares = gt.sample_groups(sizes, content, 4000, group_size, g)
    assert classes.shape == (4000, group_size, 5) and classes.dtype == torch.long and shares.dtype == torch.bool
    assert (classes >= 0).all() and (classes < torch.tensor(sizes)).all()
    assert abs(shares.float().mean().item() - 0.5) < 0.03  # the 1/2 split (4000 draws: sd 0.008)
    is_content = torch.tensor([True, True, True, False, False])
    equal = (classes == classes[:, :1]).all(1)  # (B, K): factor equal across the group's members
    shared = is_content[None] == shares[:, None]
    assert equal[shared].all()  # every factor of the shared group is shared
    # The free factors are drawn anew: they agree only by chance (1/size per extra member).
    free_equal = equal[~shared].float().mean().item()
    assert free_equal < 0.2
    for k, size in enumerate(sizes):  # each free factor is uniform
        free = classes[:, :, k][~shared[:, k]].flatten()
        counts = torch.bincount(free, minlength=size).float()
        assert counts.min() > 0.5 * counts.mean()


def test_sampler_is_reproducible_from_its_generator():
    a = gt.sample_groups(gt.SHAPES3D_SIZES, (2, 3, 4), 64, 2, torch.Generator().manual_seed(7))
    b = gt.sample_groups(gt.SHAPES3D_SIZES, (2, 3, 4), 64, 2, torch.Generator().manual_seed(7))
    c = gt.sample_groups(gt.SHAPES3D_SIZES, (2, 3, 4), 64, 2, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_the_sampler_takes_indices_of_some_not_all_factors():
    g = torch.Generator().manual_seed(0)
    for content in (("shape", "scale"), (7,), tuple(range(5)), (), (1, 1)):
        with pytest.raises(ValueError, match="indices of some, not all, of the 5 factors"):
            gt.sample_groups(gt.DSPRITES_SIZES, content, 8, generator=g)


def test_content_factor_names_are_checked():
    names = list(gt.DSPRITES_FACTORS)
    assert gt.resolve_factors("scale, shape", names) == (0, 1)
    with pytest.raises(gt.UserError, match="unknown factor 'colour'"):
        gt.resolve_factors("shape,colour", names)
    with pytest.raises(gt.UserError, match="non-empty"):
        gt.resolve_factors("", names)
    with pytest.raises(gt.UserError, match="non-empty"):
        gt.resolve_factors(",".join(names), names)


# ------------------------------------------------------------------------------------------------ objectives
def test_reconstruction_is_the_bernoulli_log_likelihood():
    g = torch.Generator().manual_seed(0)
    logits, x = torch.randn(3, 1, 4, 4, generator=g), torch.rand(3, 1, 4, 4, generator=g).round()
    p = torch.sigmoid(logits)
    expected = -(x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1)
    assert torch.allclose(gt.reconstruction(logits, x), expected, atol=1e-5)


def test_gaussian_kls_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu1, lv1, mu2, lv2 = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(4))
    q1, q2 = Normal(mu1, (0.5 * lv1).exp()), Normal(mu2, (0.5 * lv2).exp())
    assert torch.allclose(gt.gaussian_kl(mu1, lv1, mu2, lv2), kl_divergence(q1, q2))
    prior = Normal(torch.zeros_like(mu1), torch.ones_like(mu1))
    assert torch.allclose(gt.kl_to_prior(mu1, lv1), kl_divergence(q1, prior))
    assert torch.allclose(gt.kl_to_prior(torch.zeros(3), torch.zeros(3)), torch.zeros(3))


def test_gvae_averages_means_and_variances():
    mu = torch.tensor([[[1.0, -2.0], [3.0, 0.0]]], dtype=torch.float64)  # (B=1, G=2, L=2)
    var = torch.tensor([[[1.0, 4.0], [3.0, 0.5]]], dtype=torch.float64)
    m, lv = gt.average_posterior(mu, var.log())
    assert torch.allclose(m, torch.tensor([[[2.0, -1.0]]], dtype=torch.float64))
    assert torch.allclose(lv.exp(), torch.tensor([[[2.0, 2.25]]], dtype=torch.float64))  # variances, not log-vars


def test_mlvae_is_the_product_of_gaussians():
    mu = torch.tensor([[[1.0], [3.0]]], dtype=torch.float64)
    var = torch.tensor([[[1.0], [3.0]]], dtype=torch.float64)
    m, lv = gt.product_posterior(mu, var.log())
    # Pair: var = v1 v2 / (v1 + v2) = 0.75; mean = (m1 v2 + m2 v1) / (v1 + v2) = 1.5
    assert torch.allclose(lv.exp(), torch.tensor(0.75, dtype=torch.float64))
    assert torch.allclose(m, torch.tensor(1.5, dtype=torch.float64))
    # Three members: the normalised product of the densities, checked numerically on a grid.
    mu3 = torch.tensor([[[0.5], [-1.0], [2.0]]], dtype=torch.float64)
    lv3 = torch.tensor([[[0.0], [-1.0], [1.0]]], dtype=torch.float64)
    m3, v3 = gt.product_posterior(mu3, lv3)
    grid = torch.linspace(-10, 10, 200_001, dtype=torch.float64)
    log_density = sum(Normal(mu3[0, i, 0], (0.5 * lv3[0, i, 0]).exp()).log_prob(grid) for i in range(3))
    w = (log_density - log_density.max()).exp()
    w = w / w.sum()
    mean = (w * grid).sum()
    assert abs(mean - m3.item()) < 1e-6 and abs((w * (grid - mean) ** 2).sum() - v3.exp().item()) < 1e-6


def test_group_kl_averages_both_directions_over_shared_dims():
    g = torch.Generator().manual_seed(1)
    for G in (2, 3):
        mu, lv = torch.randn(4, G, 6, generator=g, dtype=torch.float64), torch.randn(4, G, 6, generator=g,
                                                                                      dtype=torch.float64)
        shared = torch.rand(4, 6, generator=g) < 0.5
        expected = 0.0
        for b in range(4):
            for i in range(G):
                for j in range(G):
                    if i != j:
                        kl = gt.gaussian_kl(mu[b, i], lv[b, i], mu[b, j], lv[b, j])
                        expected += kl[shared[b]].sum().item() / (G * (G - 1))
        assert math.isclose(gt.group_kl(mu, lv, shared).item(), expected / 4, rel_tol=1e-10)
    # Identical posteriors: zero.
    mu = torch.randn(2, 1, 6).expand(2, 2, 6)
    assert gt.group_kl(mu, torch.zeros(2, 2, 6), torch.ones(2, 6, dtype=torch.bool)).item() == 0


def test_shared_dims_follow_the_shared_group():
    shared = gt.shared_dims(torch.tensor([True, False]), 10, 4)
    assert shared[0].tolist() == [False] * 6 + [True] * 4  # shares content: z_c = the last 4 dims
    assert shared[1].tolist() == [True] * 6 + [False] * 4


@pytest.mark.parametrize("level", gt.TC_LEVELS)
def test_permutations_of_each_tc_level(level):
    N, L, C = 64, 7, 3
    z = (torch.arange(N)[:, None] * 100 + torch.arange(L)[None]).float()  # value = 100 * row + dim
    blocks = gt.tc_blocks(level, L, C)
    zp = gt.permute_codes(z, blocks, torch.Generator().manual_seed(0))
    rows = (zp // 100).long()  # the source row of every entry
    assert torch.equal(zp % 100, z % 100)  # every column keeps its own dim
    for l in range(L):
        assert sorted(rows[:, l].tolist()) == list(range(N))  # each column is a permutation of the batch
    n_s = L - C
    same = lambda a, b: torch.equal(rows[:, a], rows[:, b])
    assert same(n_s, L - 1) == (level != "full")  # z_c moves as a block except in 'full'
    assert same(0, n_s - 1) == (level == "inter")  # z_\c moves as a block only in 'inter'
    assert not same(0, n_s)  # z_c and z_\c are always permuted independently
    assert not torch.equal(rows[:, 0], torch.arange(N))


def test_tc_estimate_and_discriminator_loss_formulas():
    logits = torch.tensor([[2.0, 0.5], [0.0, 1.0]])
    assert math.isclose(gt.tc_estimate(logits).item(), ((2.0 - 0.5) + (0.0 - 1.0)) / 2)
    torch.manual_seed(0)
    D = gt.Discriminator(4, hidden=16, layers=2)
    z, zp = torch.randn(8, 4), torch.randn(8, 4)
    loss, acc = gt.discriminator_loss(D, z, zp)
    expected = 0.5 * (F.cross_entropy(D(z), torch.zeros(8, dtype=torch.long))
                      + F.cross_entropy(D(zp), torch.ones(8, dtype=torch.long)))
    assert torch.allclose(loss, expected)
    correct = (D(z).argmax(1) == 0).sum() + (D(zp).argmax(1) == 1).sum()
    assert math.isclose(acc.item(), correct.item() / 16)


def correlated_codes(n, rho, generator):
    """(n, 10) Gaussian codes, z_\\c = dims 0-4 and z_c = dims 5-9, every dim independent but for one cross pair:
    corr(z_0, z_5) = rho. Their TC, inter-group or total alike, is -log(1 - rho^2) / 2 nats."""
    z = torch.randn(n, 10, generator=generator)
    z[:, 5] = rho * z[:, 0] + math.sqrt(1 - rho ** 2) * z[:, 5]
    return z


@pytest.mark.parametrize("level", ["inter", "full"])  # the paper's and FactorVAE's; inter_intra lies between
def test_the_tc_estimate_measures_dependence(level):
    """The discriminator, trained as the training loop trains it (the same 6 x 1000 network, Adam 1e-4 with betas
    0.5/0.9, 64 codes a step, the level's permutation), on codes whose TC is known in closed form: the estimate is
    about 0 for independent groups and grows with the true TC. 200 steps: a mid-sized TC is still underestimated
    then (about half of it), a large one is met within 20%."""
    estimates = {}
    for rho in (0.0, 0.7, 0.95) if level == "inter" else (0.95,):  # independence: the same at every level
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        D = gt.Discriminator(10)
        opt = torch.optim.Adam(D.parameters(), lr=1e-4, betas=(0.5, 0.9))
        blocks = gt.tc_blocks(level, 10, 5)
        for _ in range(200):
            z = correlated_codes(64, rho, g)
            loss, _ = gt.discriminator_loss(D, z, gt.permute_codes(z, blocks, g))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            estimates[rho] = gt.tc_estimate(D(correlated_codes(8192, rho, g))).item()
    true_tc = {rho: -0.5 * math.log(1 - rho ** 2) for rho in estimates}  # 0, 0.337, 1.164 nats
    assert abs(estimates.get(0.0, 0.0)) < 0.05
    assert abs(estimates[0.95] - true_tc[0.95]) < 0.2 * true_tc[0.95]
    if 0.7 in estimates:
        assert 0.25 * true_tc[0.7] < estimates[0.7] < 1.2 * true_tc[0.7]
        assert estimates[0.0] < estimates[0.7] < estimates[0.95]


def tiny_run(tmp_path, *extra, model="group_tcvae"):
    args, = gt.expand(gt.parse_args(["--model", model, "--dataset", "dsprites_procedural", "--batch-size", "4",
                                     "--out", str(tmp_path / "run"), *extra]))
    return gt.build_runs([args])[0]


def tiny_batch(run):
    classes, shares = run.sample()
    return run.data.images(classes.flatten(0, 1)).view(*classes.shape[:2], 1, 64, 64), shares


def test_discriminator_update_leaves_the_encoder_gradients_untouched(tmp_path):
    run = tiny_run(tmp_path)
    for _ in range(3):  # several full steps: no in-place autograd error (a known failure of FactorVAE ports)
        run.next_step()
    a = run.args
    x, shares = tiny_batch(run)
    # train_step()'s two halves, with the gradients looked at in between.
    run.D.requires_grad_(False)
    loss, terms, z = gt.group_objective("group_tcvae", run.vae, run.D, x, shares, a.beta, a.gamma, a.content_dims,
                                        run.model_gen)
    run.vae_opt.zero_grad()
    run.d_opt.zero_grad(set_to_none=True)
    loss.backward()
    assert all(p.grad is None for p in run.D.parameters())  # the VAE's loss does not train D
    before = [p.grad.clone() for p in run.vae.parameters()]
    run.D.requires_grad_(True)
    d_loss, _ = gt.discriminator_loss(run.D, z, gt.permute_codes(z.detach(), gt.tc_blocks(a.tc_level, 10, 5)))
    d_loss.backward()
    run.d_opt.step()
    assert all(torch.equal(b, p.grad) for b, p in zip(before, run.vae.parameters()))
    assert all(p.grad is not None for p in run.D.parameters())
    # train_step() itself: D's step moves D and leaves the encoder's gradients as the VAE's step left them.
    D_before = [p.detach().clone() for p in run.D.parameters()]
    grads = {}

    def spy(opt, key):
        step = opt.step

        def recorded(*args, **kwargs):
            grads[key] = [p.grad.clone() for p in run.vae.parameters()]
            return step(*args, **kwargs)
        opt.step = recorded

    spy(run.vae_opt, "at the VAE's step")
    spy(run.d_opt, "at D's step")
    gt.train_step(run.vae, run.D, run.vae_opt, run.d_opt, x, shares, "group_tcvae", a.beta, a.gamma, 5, "inter",
                  run.model_gen)
    assert all(torch.equal(a, b) for a, b in zip(grads["at the VAE's step"], grads["at D's step"]))
    assert all(p.requires_grad for p in run.D.parameters())  # unfrozen again
    assert not all(torch.equal(b, p) for b, p in zip(D_before, run.D.parameters()))


def test_train_step_refuses_a_bad_tc_level_before_it_steps(tmp_path):
    run = tiny_run(tmp_path)
    x, shares = tiny_batch(run)
    before = [p.detach().clone() for p in run.vae.parameters()]
    with pytest.raises(ValueError, match="unknown TC level 'Full'"):
        gt.train_step(run.vae, run.D, run.vae_opt, run.d_opt, x, shares, tc_level="Full")
    assert all(torch.equal(a, b) for a, b in zip(before, run.vae.parameters()))


def test_objectives_assemble_their_terms(tmp_path):
    run = tiny_run(tmp_path, "--beta", "3", "--gamma", "5")
    classes, shares = gt.sample_groups(run.data.factor_sizes, run.content_factors, 4, 2, run.data_gen)
    x = run.data.images(classes.flatten(0, 1)).view(4, 2, 1, 64, 64)
    for model in gt.OBJECTIVES:
        loss, terms, z = gt.group_objective(model, run.vae, run.D, x, shares, 3.0, 5.0, 5,
                                            torch.Generator().manual_seed(0))
        assert z.shape == (8, 10)
        if model == "group_tcvae":
            expected = terms["rec"] + terms["kl"] + 3 * terms["tc"] + 5 * terms["group_kl"]
        else:
            expected = terms["rec"] + 3 * terms["kl"]
        assert torch.allclose(loss, expected)
    # The baselines' shared dims really take the group posterior: both members get the same (mu, logvar) there.
    mu, lv = (t.view(4, 2, -1) for t in run.vae.encode(x.flatten(0, 1)))
    m, l = gt.average_posterior(mu, lv)
    shared = gt.shared_dims(shares, 10, 5)
    agg = torch.where(shared[:, None], m, mu)
    assert torch.equal(agg[:, 0][shared], agg[:, 1][shared])


# ------------------------------------------------------------------------------------------------ metrics
def slow_mutual_info(codes, factors, n_bins=20):
    """disentanglement_lib's recipe written out with plain loops: numpy.histogram edges, numpy.digitize labels,
    plug-in MI from the joint frequency table."""
    N, L = codes.shape
    mi = np.zeros((L, factors.shape[1]))
    for i in range(L):
        labels = np.digitize(codes[:, i], np.histogram(codes[:, i], n_bins)[1][:-1])
        for k in range(factors.shape[1]):
            joint, row, col = {}, {}, {}
            for a, b in zip(labels.tolist(), factors[:, k].tolist()):
                joint[a, b] = joint.get((a, b), 0) + 1
                row[a] = row.get(a, 0) + 1
                col[b] = col.get(b, 0) + 1
            mi[i, k] = sum(c / N * math.log(c * N / (row[a] * col[b])) for (a, b), c in joint.items())
    return mi


def slow_entropy(f):
    _, counts = np.unique(f, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def slow_mig(codes, factors):
    mi = slow_mutual_info(codes, factors)
    gaps = []
    for k in range(factors.shape[1]):
        h = slow_entropy(factors[:, k])
        if h > 0:
            top = sorted(mi[:, k], reverse=True)
            gaps.append((top[0] - top[1]) / h)
    return float(np.mean(gaps))


def slow_group_mig(codes, factors, content_latents, content_factors):
    mi = slow_mutual_info(codes, factors)
    terms = []
    for k in range(factors.shape[1]):
        h = slow_entropy(factors[:, k])
        if h == 0:
            continue
        own = [i for i in range(codes.shape[1]) if (i in content_latents) == (k in content_factors)]
        other = [i for i in range(codes.shape[1]) if i not in own]
        terms.append((max(mi[own, k]) - max(mi[other, k])) / h)
    return float(np.mean(terms))


def awkward_codes(n, seed):
    """Codes with the cases that trip histogram estimators: ties, a constant dim, outliers, negative values."""
    rng = np.random.default_rng(seed)
    factors = np.stack([rng.integers(0, s, n) for s in (3, 6, 40, 1, 7)], 1)  # a one-valued factor too
    codes = np.stack([factors[:, 0] + 0.3 * rng.standard_normal(n), np.round(rng.standard_normal(n), 1),
                      np.full(n, 2.5), factors[:, 2] / 7.0 + 0.01 * rng.standard_normal(n),
                      rng.standard_normal(n) ** 3, -np.abs(factors[:, 4] - 3.0), factors[:, 1] * 1.0], 1)
    return codes, factors


@pytest.mark.parametrize("n", [1, 2, 999, 2001])
def test_metrics_match_the_slow_definition(n):
    codes, factors = awkward_codes(n, seed=n)
    mi = gt.mutual_info_matrix(codes, factors)
    assert mi.shape == (7, 5)
    assert np.abs(mi - slow_mutual_info(codes, factors)).max() < 1e-9
    if n > 1:
        assert abs(gt.mig(codes, factors) - slow_mig(codes, factors)) < 1e-9
        assert abs(gt.group_mig(codes, factors, [4, 5, 6], [0, 1, 2]) -
                   slow_group_mig(codes, factors, [4, 5, 6], [0, 1, 2])) < 1e-9
    labels = [np.unique(f, return_inverse=True)[1] for f in factors.T]
    H = [-(p * np.log(p)).sum() for p in (np.bincount(f) / len(f) for f in labels)]
    assert np.allclose(gt.mutual_info_and_entropy(codes, factors)[1], [slow_entropy(f) for f in factors.T], atol=1e-12)
    assert np.allclose(H, [slow_entropy(f) for f in factors.T], atol=1e-12)


def test_metrics_accept_arbitrary_integer_labels():
    codes, factors = awkward_codes(500, seed=4)
    shifted = factors * 1_000_003 - 7  # large and negative classes: relabelled, same MI
    assert np.abs(gt.mutual_info_matrix(codes, shifted) - gt.mutual_info_matrix(codes, factors)).max() < 1e-12


def test_mi_closed_forms():
    rng = np.random.default_rng(0)
    v = rng.integers(0, 10, (100_000, 1))
    # I(v; v) = H(v) when each value lands in its own bin.
    assert abs(gt.mutual_info_matrix(v.astype(float), v)[0, 0] - slow_entropy(v[:, 0])) < 1e-12
    # Independent code and factor: about 0 (plug-in bias ~ (bins-1)(values-1)/2N = 8.6e-4).
    assert gt.mutual_info_matrix(rng.standard_normal((100_000, 1)), v)[0, 0] < 2e-3
    # Constant and duplicated latents.
    assert gt.mutual_info_matrix(np.zeros((1000, 1)), v[:1000])[0, 0] == 0
    assert gt.mig(np.zeros((1000, 3)), v[:1000]) == 0
    dup = np.repeat(v[:1000].astype(float), 2, axis=1)
    assert gt.mig(dup, v[:1000]) == 0


def test_the_mi_kernels_leave_torchs_threads_alone():
    """Numba's OpenMP layer set torch's thread count to every core on first use, so training after an evaluation
    in one process ran on other threads than OMP_NUM_THREADS said (30x slower on shared cores, other sums). And the
    kernels run on torch's count, not Numba's default of every core (which oversubscribed cores that runs share),
    and give Numba's count back after the call."""
    code = ("import numpy as np, numba, torch, grouptc as gt; before = torch.get_num_threads(); "
            "c, f = np.random.rand(500, 3), np.random.randint(0, 4, (500, 2)); gt.mutual_info_matrix(c, f); "
            "print(before, torch.get_num_threads(), numba.get_num_threads(), numba.config.NUMBA_NUM_THREADS); "
            "kernel, ranges = gt._get_mi_kernel(); seen = []; "
            "gt._mi_kernel = (lambda *a: seen.append((a[-1], numba.get_num_threads())) or kernel(*a), ranges); "
            "gt.mutual_info_matrix(c, f); torch.set_num_threads(2); gt.mutual_info_matrix(c, f); "
            "print(*seen[0], *seen[1])")
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"} | {
                             "OMP_NUM_THREADS": "1"}, timeout=120)
    assert len(out.stdout.split()) == 8, out.stdout + out.stderr
    before, after, numba_after, numba_default, *seen = map(int, out.stdout.split())
    most = min(2, numba_default)  # Numba's count, every core the process may use, caps torch's
    assert (before, after, numba_after) == (1, 1, numba_default) and seen == [1, 1, most, most]


def test_the_mi_kernels_give_the_same_counts_in_any_number_of_chunks():
    """The kernels split the points into n_chunks parts counted in parallel (the thread count): integer counts and
    min / max, so MI, entropies and ranges are equal, to the bit, for any number of parts."""
    kernel, ranges = gt._get_mi_kernel()
    rng = np.random.default_rng(0)
    codes = rng.normal(size=(1001, 4))
    labels = rng.integers(0, 5, size=(1001, 3))
    edges = np.stack([np.linspace(-3, 3, 21)[:-1]] * 4)
    unfinite = codes.copy()
    unfinite[3, 1] = np.inf  # the ranges kernel counts it (and the caller raises before the histograms)
    first = [kernel(codes, edges, labels, 5, 1), ranges(unfinite, 1)]
    for n in (2, 7, 1001):
        again = [kernel(codes, edges, labels, 5, n), ranges(unfinite, n)]
        assert all(np.array_equal(a, b) for a, b in zip(first[0], again[0]))  # MI and entropies
        lo, hi, bad = again[1]
        assert np.array_equal(lo.min(0), first[1][0].min(0)) and np.array_equal(hi.max(0), first[1][1].max(0))
        assert bad == first[1][2] == 1


def test_perfect_code_on_the_dsprites_grid_scores_0_8955():
    """reference.md: an identity code of 10,000 uniform dSprites points scores about 0.8955 under 20 bins."""
    rng = np.random.default_rng(0)
    factors = np.stack([rng.integers(0, s, 10_000) for s in gt.DSPRITES_SIZES], 1)
    score = gt.mig(factors.astype(float), factors)
    assert abs(score - 0.8955) < 0.01
    # group-MIG subtracts only the best latent of the OTHER group, so it is at least MIG here.
    assert score <= gt.group_mig(factors.astype(float), factors, [0, 1, 2], [0, 1, 2]) < score + 0.01


def test_group_mig_is_negative_when_information_sits_in_the_wrong_group():
    rng = np.random.default_rng(1)
    factors = np.stack([rng.integers(0, 6, 5000) for _ in range(4)], 1)
    codes = factors.astype(float) + 0.05 * rng.standard_normal((5000, 4))
    # latents 0,1 carry factors 0,1 and are called content; but factors 2,3 are the content factors.
    assert gt.group_mig(codes, factors, content_latents=[0, 1], content_factors=[2, 3]) < -0.5
    assert gt.group_mig(codes, factors, content_latents=[2, 3], content_factors=[2, 3]) > 0.5


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        gt.mutual_info_matrix(np.array([[np.nan], [1.0]]), np.array([[0], [1]]))
    with pytest.raises(ValueError, match="integer"):
        gt.mutual_info_matrix(np.zeros((2, 1)), np.zeros((2, 1)))
    with pytest.raises(ValueError, match="N = len"):
        gt.mutual_info_matrix(np.zeros((3, 1)), np.zeros((2, 1), int))
    codes, factors = np.random.default_rng(0).standard_normal((50, 3)), np.arange(100).reshape(50, 2) % 3
    with pytest.raises(ValueError, match="at least 2 columns, got 1"):
        gt.mig(codes[:, :1], factors)
    with pytest.raises(ValueError, match="single value"):
        gt.mig(codes, np.zeros((50, 2), int))
    for latents, content in (([0], ("shape",)), ([0], [0, 0]), ([0], [0, 1]), ([0, 1, 2], [0]), ([], [0])):
        with pytest.raises(ValueError, match="some, not all"):
            gt.group_mig(codes, factors, latents, content)


# ------------------------------------------------------------------------------------------------ training runs
@pytest.fixture(autouse=True)
def quick_figures(request, monkeypatch):
    """Most tests check that a figure is written, not how it looks: drawn at 10 dpi without the layout pass, a run's
    figures cost a fraction of their time. The tests that look at the pictures take `real_figures`."""
    if "real_figures" not in request.fixturenames:
        def save(fig, path, dpi):
            try:
                gt.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=10, format="png"))
            finally:
                gt._plt().close(fig)
        monkeypatch.setattr(gt, "save_figure", save)


@pytest.fixture
def real_figures():
    """The figures as grouptc draws them (see quick_figures)."""


TINY = ["--steps", "6", "--batch-size", "4", "--log-every", "3", "--checkpoint-every", "3", "--eval-samples", "300"]
FIGURES = ("mi_matrix.png", "reconstructions.png", "traversals.png", "training_curves.png")


@pytest.mark.parametrize("model,dataset,extra", [
    ("group_tcvae", "dsprites_procedural", []),
    ("group_tcvae", "dsprites_procedural", ["--tc-level", "inter_intra", "--group-size", "3"]),
    ("group_tcvae", "shapes3d_procedural", ["--tc-level", "full"]),
    ("mlvae", "dsprites_procedural", ["--group-size", "5"]),
    ("gvae", "shapes3d_procedural", ["--content-factors", "floor_hue,wall_hue"]),
])
def test_every_model_trains_and_writes_every_output(tmp_path, model, dataset, extra, real_figures):
    out = tmp_path / "run"
    assert gt.main(["--model", model, "--dataset", dataset, "--out", str(out), *TINY, *extra]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == model and config["dataset"] == dataset
    rows = gt.read_log(out / "log.csv")
    assert [int(r["step"]) for r in rows] == [3, 6]
    assert set(gt.MODELS[model].terms) | {"step", "ms_per_step"} == set(rows[0])
    assert all(math.isfinite(float(v)) for r in rows for v in r.values())
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("mig", "group_mig", "mi_matrix", "factor_names", "model", "dataset", "steps", "train_seconds"):
        assert key in metrics
    assert metrics["steps"] == 6 and metrics["eval_samples"] == 300 and metrics["train_seconds"] > 0
    assert np.array(metrics["mi_matrix"]).shape == (10, len(metrics["factor_names"]))
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 6 and {"vae", "vae_opt", "data_gen", "model_gen", "args"} <= set(checkpoint)
    for name in FIGURES:
        assert (out / name).stat().st_size > 5_000, name


def run_main_interrupted_at(step, argv):
    """Run main() and press Ctrl-C (a real SIGINT) right after training step `step`."""
    original = gt.Sweep.train_step

    def step_then_interrupt(self):
        values = original(self)
        if self.step == step:
            os.kill(os.getpid(), signal.SIGINT)
        return values

    gt.Sweep.train_step = step_then_interrupt
    try:
        with pytest.raises(SystemExit) as stop:
            gt.main(argv)
        return stop.value.code
    finally:
        gt.Sweep.train_step = original


@pytest.mark.parametrize("model", ["group_tcvae", "mlvae"])
def test_interrupted_and_resumed_run_logs_exactly_like_an_uninterrupted_one(tmp_path, model):
    argv = ["--model", model, "--dataset", "dsprites_procedural", "--steps", "12", "--batch-size", "4",
            "--log-every", "4", "--checkpoint-every", "100", "--eval-samples", "200", "--device", "cpu"]
    assert gt.main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert run_main_interrupted_at(6, argv + ["--out", str(tmp_path / "b")]) == 130  # Ctrl-C writes a checkpoint
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 6
    assert gt.main(["--resume", "--out", str(tmp_path / "b")]) == 0  # the saved flags come back
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != "ms_per_step"} for r in rows]
    a, b = gt.read_log(tmp_path / "a" / "log.csv"), gt.read_log(tmp_path / "b" / "log.csv")
    assert [r["step"] for r in a] == ["4", "8", "12"]
    assert drop_time(a) == drop_time(b)
    ma, mb = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in "ab")
    assert ma["mi_matrix"] == mb["mi_matrix"]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    # On the CPU: on CUDA the step is replayed from a graph, and a Python-side poison would run only at capture.
    original = gt.group_objective
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, terms, z = original(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), terms, z) if calls["n"] >= 5 else (loss, terms, z)

    monkeypatch.setattr(gt, "group_objective", poisoned)
    out = tmp_path / "run"
    code = gt.main(["--model", "gvae", "--dataset", "dsprites_procedural", "--steps", "8", "--batch-size", "4",
                    "--log-every", "2", "--checkpoint-every", "2", "--out", str(out), "--device", "cpu"])
    assert code == 2
    assert "NaN or infinite" in capsys.readouterr().err
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 4  # steps 1-4 were good
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("flags,message", [
    (["--beta", "-1"], "--beta must be a non-negative"),
    (["--gamma", "nan"], "--gamma must be a non-negative"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--steps", "-5"], "--steps must be positive"),
    (["--group-size", "1"], "--group-size must be at least 2"),
    (["--content-dims", "10"], "--content-dims (10) must be smaller than --latent-dim (10)"),
    (["--content-factors", "shape,hue"], "unknown factor 'hue'"),
    (["--device", "tpu9"], "--device"),
    (["--eval-samples", "-1"], "--eval-samples"),
])
def test_bad_flags_get_a_clear_message(tmp_path, capsys, flags, message):
    code = gt.main(["--dataset", "dsprites_procedural", "--out", str(tmp_path / "run"), *TINY, *flags])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_an_existing_run_is_never_overwritten(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert gt.main(["--model", "mlvae", "--dataset", "dsprites_procedural", "--out", out, *TINY]) == 0
    before = (tmp_path / "run" / "metrics.json").read_bytes()
    assert gt.main(["--model", "mlvae", "--dataset", "dsprites_procedural", "--out", out, *TINY]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert gt.main(["--resume", "--out", out, "--model", "gvae"]) == 2
    assert "--model gvae differs" in capsys.readouterr().err
    assert (tmp_path / "run" / "metrics.json").read_bytes() == before


def test_eval_only_re_evaluates_a_saved_run(tmp_path):
    out = str(tmp_path / "run")
    assert gt.main(["--model", "gvae", "--dataset", "dsprites_procedural", "--out", out, *TINY]) == 0
    first = json.loads((tmp_path / "run" / "metrics.json").read_text())
    (tmp_path / "run" / "mi_matrix.png").unlink()
    assert gt.main(["--eval-only", "--out", out, "--eval-samples", "700"]) == 0
    again = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert again["eval_samples"] == 700 and again["steps"] == first["steps"] and again["model"] == "gvae"
    assert (tmp_path / "run" / "mi_matrix.png").exists()
    assert gt.main(["--eval-only", "--out", str(tmp_path / "nothing")]) == 2


def test_evaluation_on_every_point_uses_the_whole_grid(tmp_path, monkeypatch):
    run = tiny_run(tmp_path, model="gvae")
    monkeypatch.setattr(type(run.data), "factor_sizes", (3, 2, 2, 4, 3))  # a small grid: 144 points
    metrics, codes, factors = gt.evaluate(run.vae, run.data, run.content_factors, 5, 0)
    assert metrics["eval_samples"] == 144 and codes.shape == (144, 10) and len(np.unique(factors, axis=0)) == 144


# ------------------------------------------------------------------------------------------------ grid, README
def test_run_paper_dry_run_lists_the_whole_grid():
    out = subprocess.run(["bash", "run_paper.sh"], cwd=HERE, env=os.environ | {"DRY_RUN": "1"},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 620 and len(set(out)) == 620
    assert all(line.startswith("python grouptc.py --model ") for line in out)
    count = lambda *parts: sum(all(p in line for p in parts) for line in out)
    for d in ("dsprites", "shapes3d"):
        assert count("--model group_tcvae", f"--dataset {d} ", "--tc-level inter ", "--group-size 2 ") == 150
        for m in ("mlvae", "gvae"):
            assert count(f"--model {m}", f"--dataset {d} ", "--group-size 2 ") == 30
            for gs in (3, 5, 10):
                assert count(f"--model {m}", f"--dataset {d} ", f"--group-size {gs} ") == 5
        assert count("--model group_tcvae", f"--dataset {d} ", "--tc-level full") == 5
        for m in ("ada_gvae", "ada_mlvae"):  # Locatello et al. 2020's models, on the paper's group pairs
            assert count(f"--model {m}", f"--dataset {d} ", "--pairs groups") == 30
    for line in out[:3]:  # every flag explicit, and each line parses
        args = gt.parse_args(line.split()[2:])
        assert len(args.given) >= 18
    runs = {str(Path(gt.expand(gt.parse_args(line.split()[2:]))[0].out)) for line in out}
    part = subprocess.run(["bash", "run_paper.sh"], cwd=HERE, env=os.environ | {"DRY_RUN": "1", "METRICS": "all",
                          "ONLY_MODELS": "ada_gvae mlvae"}, capture_output=True, text=True, check=True).stdout
    assert sorted(part.replace(" --metrics all", "").splitlines()) == sorted(
        line for line in out if "--model ada_gvae " in line or "--model mlvae " in line)  # part: 60 + 90 runs
    assert all(gt.parse_args(line.split()[2:]).metrics == gt.parse_metrics("all") for line in part.splitlines())
    bad = subprocess.run(["bash", "run_paper.sh"], cwd=HERE, env=os.environ | {"DRY_RUN": "1", "METRICS": "sap,dcx"},
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "METRICS must be" in bad.stderr and not bad.stdout
    sbatch = re.search(r"SWEEP_SIZE=(\d+) sbatch --array=0-(\d+)", (HERE / "run_paper.sh").read_text())
    assert (int(sbatch[1]), int(sbatch[2]) + 1) == (64, 30)  # the header's SLURM example: one task per process
    for size, processes in ((32, 34), (64, 30)):  # the same 620 runs, packed into sweeps of <= size runs
        packed = subprocess.run(["bash", "run_paper.sh"], cwd=HERE, env=os.environ | {"DRY_RUN": "1",
                                "SWEEP_SIZE": str(size)}, capture_output=True, text=True, check=True).stdout
        members = []
        for line in packed.splitlines():
            ms = gt.expand(gt.parse_args(line.split()[2:]))
            assert len(ms) <= size and len({(m.model, m.dataset, m.group_size, m.tc_level) for m in ms}) == 1
            members += [m for m in ms]
        assert len(packed.splitlines()) == processes and len(members) == 620
        assert {gt.run_name(m) for m in members} == {Path(r).name for r in runs}


def test_a_tiny_grid_runs_through_run_paper_and_the_summary_whatever_the_packing(tmp_path):
    env = os.environ | {"STEPS": "2", "SEEDS": "0", "DATASETS": "dsprites_procedural", "TCVAE_BETAS": "10",
                        "TCVAE_GAMMAS": "1", "BASE_BETAS": "1", "GROUP_SIZES": "2", "TC_LEVELS": "inter",
                        "ABLATION_GAMMA": "1", "ADA_MODELS": "ada_gvae", "ADA_BETAS": "1", "PAIRS": "k_factors",
                        "EVAL_SAMPLES": "200", "JOBS": "2", "RUNS_DIR": str(tmp_path / "runs"),
                        "PYTHON": sys.executable}
    done = subprocess.run(["bash", "run_paper.sh"], cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted((tmp_path / "runs" / "dsprites_procedural").iterdir())
    # group-tcVAE, MLVAE, GVAE, Ada-GVAE on k-factor pairs: 4 runs, one a process (the dry run lists group sizes)
    assert len(runs) == 4 and all((r / "metrics.json").exists() for r in runs)  # each at DATASET/NAME
    for name in ("figure4", "figure3b", "figure3c"):
        assert (tmp_path / "runs" / f"{name}_dsprites_procedural.png").stat().st_size > 5_000
    table = (tmp_path / "runs" / "results.md").read_text()
    assert "| group_tcvae | 10 | 1 | 2 |" in table and "| mlvae | 1 | 0 | 2 |" in table
    assert "| ada_gvae (k_factors, k rnd) | 1 | 0 | 2 |" in table  # off the paper's grid: in the table alone
    assert "Figures 4 and 3(b) leave out 1 run off the paper's main grid (ada_gvae (k_factors, k rnd))" in done.stderr
    before = {r.name: (r / "metrics.json").read_bytes() for r in runs}
    again = subprocess.run(["bash", "run_paper.sh"], cwd=HERE, env=env | {"SWEEP_SIZE": "4"}, capture_output=True,
                           text=True)  # packed into sweeps now: every run is found finished, nothing starts
    assert again.returncode == 0 and "start" not in again.stderr, again.stderr[-2000:]
    grown = subprocess.run(["bash", "run_paper.sh"], cwd=HERE, env=env | {
        "SEEDS": "0 1", "SWEEP_SIZE": "4", "ONLY_MODELS": "mlvae gvae"}, capture_output=True,
        text=True, timeout=600)  # a seed more, packed: sweeps into DATASET/ train seed 1 beside the finished seed 0
    assert grown.returncode == 0 and "2 processes" in grown.stderr, grown.stderr[-3000:]
    runs = sorted((tmp_path / "runs" / "dsprites_procedural").iterdir())
    assert len(runs) == 6 and {r.name: (r / "metrics.json").read_bytes() for r in runs if r.name in before} == before
    table = (tmp_path / "runs" / "results.md").read_text()
    assert "# Results: 6 runs" in table and "| gvae | 1 | 0 | 2 | 2 |" in table


def test_a_summary_label_names_what_sets_a_run_apart_from_the_main_grid():
    m = {"model": "mlvae", "dataset": "dsprites_procedural", "group_size": 2, "batch_size": 32, "latent_dim": 10,
         "content_dims": 5, "tc_level": "inter", "pairs": "groups"}
    assert gt.run_label(m) == "mlvae"
    assert gt.run_label(m | {"group_size": 3, "batch_size": 4}) == "mlvae (group size 3) (batch 4)"
    assert gt.run_label(m | {"model": "group_tcvae", "tc_level": "full"}) == "group_tcvae (TC full)"
    assert gt.run_label(m | {"model": "ada_gvae", "pairs": "k_factors", "k": 1}) == "ada_gvae (k_factors, k 1)"
    assert gt.run_label(m | {"content_factors": "shape,scale"}) == "mlvae (content shape,scale)"
    assert gt.run_label(m | {"factor_sizes": [3, 6, 40, 32, 32]}) == "mlvae"  # the official grid
    assert gt.run_label(m | {"factor_sizes": [3, 6, 4, 8, 8]}) == "mlvae (factor sizes 3,6,4,8,8)"  # a sub-grid's
    for off in ({"batch_size": 4}, {"latent_dim": 12}, {"content_factors": "shape,scale"}, {"pairs": "k_factors"},
                {"factor_sizes": [3, 6, 4, 8, 8]}, {"group_size": 3}):  # Figures 4 and 3(b) pool none of these
        assert gt.on_main_grid(m) and not gt.on_main_grid(m | off), off
    assert gt.on_main_grid(m | {"group_size": 5}, any_group_size=True)  # Figure 3(c)'s
    assert not gt.on_main_grid(m | {"group_size": 5, "batch_size": 4}, any_group_size=True)


def test_summary_of_an_empty_folder_is_a_clear_error(tmp_path, capsys):
    assert gt.main(["--summarize", str(tmp_path)]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def readme_shell_lines():
    """The lines of the README's shell code blocks (```bash, ```sh or plain ```), in order."""
    lines, fence = [], None
    for line in (HERE / "README.md").read_text().splitlines():
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
        elif fence in ("bash", "sh", ""):
            lines.append(line)
    return lines


def readme_commands():
    """Every `python grouptc.py ...` command in the README's shell code blocks, comments removed."""
    return [part.strip() for line in readme_shell_lines() for part in line.split("#")[0].split("&&")
            if part.strip().startswith("python grouptc.py")]


def test_readme_commands_parse_and_the_offline_ones_run(tmp_path):
    commands = readme_commands()
    assert any("--dataset dsprites_procedural" in c for c in commands)
    assert any(c.startswith("python grouptc.py --model group_tcvae --dataset dsprites") for c in commands)
    ran = 0
    for c in commands:
        argv = c.split()[2:]
        if argv == ["--help"]:
            with pytest.raises(SystemExit) as done:
                gt.parse_args(argv)
            assert done.value.code == 0
            continue
        args = gt.parse_args(argv)  # every flag of the README exists
        if "_procedural" in c and not args.eval_only and args.summarize is None:
            out = tmp_path / f"run{ran}"
            assert gt.main(argv + ["--out", str(out)] + TINY) == 0, c
            ran += 1
    assert ran >= 1


def run_paper_commands(lines):
    """The `VAR=value ... bash run_paper.sh` commands among lines (a command's continued lines joined)
    -> [(its variables, the comment after it)]."""
    commands, joined = [], ""
    for line in lines:
        joined += line.rstrip("\\").strip() + " "
        if line.endswith("\\"):
            continue
        code, _, comment = joined.partition("#")
        words = shlex.split(code) if "run_paper.sh" in code else []
        if words[-2:] == ["bash", "run_paper.sh"] and all("=" in w for w in words[:-2]):
            commands.append((dict(w.split("=", 1) for w in words[:-2]), comment))
        joined = ""
    return commands


def run_paper_lists(env):
    """The run folders' names that `run_paper.sh` lists for these variables (one run a process)."""
    out = subprocess.run(["bash", "run_paper.sh"], cwd=HERE, env=os.environ | env | {"DRY_RUN": "1"},
                         capture_output=True, text=True, check=True).stdout
    return [Path(line.split()[-1]).name for line in out.splitlines()]


def test_the_studies_commands_list_the_runs_they_say(tmp_path):
    """The README's commands for a study list exactly the runs committed under docs/STUDY/runs (names without the
    data set); run_paper.sh's examples that count their runs list that many (its SLURM example's array is checked
    where the whole grid's packing is listed). Both drifted once, when the grid gained the Ada models."""
    studies = collections.defaultdict(list)
    for env, _ in run_paper_commands(readme_shell_lines()):
        if env.get("RUNS_DIR", "").startswith("runs/"):
            study = env["RUNS_DIR"].removeprefix("runs/")
            studies[study] += run_paper_lists(env | {"RUNS_DIR": str(tmp_path / study)})
    compared = []
    for study, names in studies.items():
        committed = HERE / "docs" / study / "runs"
        if committed.is_dir():
            assert sorted(n.replace("_dsprites_procedural", "") for n in names) == sorted(
                p.name for p in committed.iterdir() if p.is_dir()), study
            compared.append(study)
    assert "cpu_study" in compared
    header = [line.removeprefix("#").strip() for line in (HERE / "run_paper.sh").read_text().splitlines()
              if line.startswith("#   ")]
    counted = 0
    for env, comment in run_paper_commands(header):
        said = re.search(r"\((\d+) runs", comment)
        if said:
            assert len(run_paper_lists(env | {"RUNS_DIR": str(tmp_path / "h")})) == int(said[1]), (env, comment)
            counted += 1
    assert counted >= 1


XEON_BEFORE_3000 = {  # 30k runs that trained on an Intel Xeon for part of their first 3,000 steps (plan.md)
    "group_tcvae_beta10_gamma8_gs2_tc-full_seed0", "group_tcvae_beta10_gamma8_gs2_tc-full_seed1"}
XEON_FROM_STEP_0 = {  # 30k runs that trained on an Intel Xeon from step 0 (plan.md): other draws of their seeds
    "gvae_beta4_gamma0_gs2_tc-inter_seed1", "mlvae_beta1_gamma0_gs2_tc-inter_seed2"}


def test_the_30k_studys_runs_at_step_3000_are_the_3k_studys_runs():
    """Each committed run of docs/cpu_study_30k (docs/cpu_study_30k/plan.md) scores at step 3,000 (its scores.csv, 6
    digits) what docs/cpu_study's 3,000-step run of the same settings and seed scores at its end: the two studies'
    3,000-step figures are of the same weights. Trained with one thread, as its metrics.json says, to 30,000 steps.
    The runs that trained on an Intel Xeon before step 3,000 (its kernels compute other sums: the byte-for-byte test)
    are other weights, whose scores at step 3,000 were within 0.008 of the 3k study's when they trained there for part
    of those steps; those that trained there from step 0 are other draws of their seeds, named in plan.md."""
    runs = sorted((HERE / "docs" / "cpu_study_30k" / "runs").glob("*/scores.csv"))
    assert runs
    plan = (HERE / "docs" / "cpu_study_30k" / "plan.md").read_text()
    assert all(f"`{name}`" in plan for name in XEON_BEFORE_3000 | XEON_FROM_STEP_0)
    for scores in runs:
        at = {int(r["step"]): r for r in gt.read_log(scores)}
        short = json.loads((HERE / "docs" / "cpu_study" / "runs" / scores.parent.name / "metrics.json").read_text())
        long = json.loads((scores.parent / "metrics.json").read_text())
        assert sorted(at) == list(range(3000, 30001, 3000)) and long["steps"] == 30000, scores.parent.name
        assert long["torch_threads"] == [1] and short["steps"] == 3000, scores.parent.name
        if scores.parent.name in XEON_FROM_STEP_0:
            continue
        for k in ("mig", "group_mig"):
            if scores.parent.name in XEON_BEFORE_3000:
                assert float(at[3000][k]) == pytest.approx(short[k], abs=0.008), (scores.parent.name, k)
            else:
                assert float(at[3000][k]) == float(f"{short[k]:.6g}"), (scores.parent.name, k)


def test_the_30k_studys_results_are_what_its_script_writes_from_the_runs(tmp_path):
    """docs/cpu_study_30k/results.md is what docs/cpu_study_30k/results.py writes from the committed runs of both
    studies (no figure typed in by hand), and the README shows its table of means as it is."""
    spec = importlib.util.spec_from_file_location("results_30k", HERE / "docs" / "cpu_study_30k" / "results.py")
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    results.main(tmp_path)
    written = (tmp_path / "results.md").read_text()
    assert written == (HERE / "docs" / "cpu_study_30k" / "results.md").read_text()
    assert "(15 runs)" in written.splitlines()[0]
    table = written.split("\n\n")[2].splitlines()  # the title, how it was written, then the means
    assert len(table) == 2 + 10 and table[0].startswith("| setting | steps | seeds | MIG |")
    assert "\n".join(table) in (HERE / "README.md").read_text()


def test_resume_keeps_the_saved_device_and_survives_a_device_change(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    argv = ["--model", "gvae", "--dataset", "dsprites_procedural", "--out", out, "--device", "cpu", *TINY]
    assert gt.main(argv) == 0
    seen = []
    original = gt.resolve_device
    monkeypatch.setattr(gt, "resolve_device", lambda name: seen.append(name) or original(name))
    assert gt.main(["--resume", "--out", out, "--steps", "8"]) == 0
    assert seen[-1] == "cpu" and seen.count("cpu") >= 1  # the run is built on the saved device, not 'auto'
    # A checkpoint whose generator states come from another kind of device: reseeded, with a note.
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    checkpoint["data_gen"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state is 16 bytes
    torch.save(checkpoint, tmp_path / "run" / "checkpoint.pt")
    assert gt.main(["--resume", "--out", out, "--steps", "10"]) == 0
    assert "generators belong to another device" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ nothing lost, nothing mixed up
BASE = ["--dataset", "dsprites_procedural", "--device", "cpu", *TINY]


def test_results_without_their_checkpoint_are_never_trained_over(tmp_path, capsys):
    out = tmp_path / "runs" / "run"  # an archive's run: its small files, its checkpoint left out
    assert gt.main(["--model", "gvae", "--out", str(out), *BASE]) == 0
    (out / "checkpoint.pt").unlink()
    kept = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file() and f.name != ".lock"}
    for argv, code, said in ((["--resume", "--out", str(out)], 0, "nothing is left to do"),
                             (["--resume", "--out", str(tmp_path / "runs")], 0, "nothing is left to do"),
                             (["--resume", "--out", str(out), "--steps", "9"], 2, "no checkpoint.pt to continue it "
                                                                                 "from to 9 steps")):
        assert gt.main(argv) == code
        assert said in capsys.readouterr().err
    (out / "config.json").unlink()
    del kept["config.json"]
    assert gt.main(["--resume", "--out", str(out), "--model", "mlvae", *BASE]) == 2  # a run of other flags
    assert "holds a run's results (metrics.json) but no checkpoint.pt" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file() and f.name != ".lock"} == kept


def test_a_refused_flag_typed_now_is_not_blamed_on_the_saved_run(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert gt.main(["--model", "gvae", "--out", out, *BASE]) == 0
    for argv, flag in ((["--eval-only", "--eval-samples", "50"], "--eval-samples must be 0"),
                       (["--resume", "--steps", "0"], "--steps must be positive")):
        assert gt.main([*argv, "--out", out]) == 2
        err = capsys.readouterr().err
        assert flag in err and "holds a flag" not in err
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    checkpoint["args"]["log_every"] = -1
    torch.save(checkpoint, tmp_path / "run" / "checkpoint.pt")
    assert gt.main(["--eval-only", "--out", out]) == 2  # this one is the saved file's
    assert "checkpoint.pt holds a flag this program refuses: --log-every must be positive" in capsys.readouterr().err


def test_eval_only_refuses_a_checkpoint_of_another_run(tmp_path, capsys):
    assert gt.main(["--model", "gvae", "--out", str(tmp_path / "gvae"), *BASE]) == 0
    assert gt.main(["--model", "mlvae", "--out", str(tmp_path / "mlvae"), *BASE]) == 0
    before = (tmp_path / "mlvae" / "metrics.json").read_bytes()
    shutil.copy(tmp_path / "gvae" / "checkpoint.pt", tmp_path / "mlvae" / "checkpoint.pt")  # put back wrongly
    assert gt.main(["--eval-only", "--out", str(tmp_path / "mlvae")]) == 2
    assert "describe different runs" in capsys.readouterr().err
    assert (tmp_path / "mlvae" / "metrics.json").read_bytes() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_run_goes_on_where_there_is_no_cuda(tmp_path, capsys):
    out = tmp_path / "run"
    assert gt.main(["--model", "gvae", "--out", str(out), *BASE]) == 0
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    checkpoint["args"]["device"] = "cuda"  # as benchmarks/gpu_grid.sh and run_paper.sh on a GPU save it
    torch.save(checkpoint, out / "checkpoint.pt")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"device": "cuda"}))
    for argv in (["--eval-only"], ["--resume", "--steps", "8"]):
        assert gt.main([*argv, "--out", str(out)]) == 0
        assert "was run with --device cuda, which this machine lacks: using --device auto" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["steps"] == 8


def test_resume_without_a_checkpoint_restarts_the_run_its_config_defines(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    config = vars(gt.expand(gt.parse_args(["--model", "gvae", "--beta", "4", "--out", str(out), *BASE]))[0])
    (out / "config.json").write_text(json.dumps(gt.public_args(argparse.Namespace(**config))))
    (out / "log.csv").write_text("step,loss,rec,kl,ms_per_step\n")
    assert gt.main(["--resume", "--out", str(out), "--model", "mlvae"]) == 2  # contradicts config.json
    assert "--model mlvae differs" in capsys.readouterr().err
    assert gt.main(["--out", str(out), *BASE]) == 2  # a folder with a config.json holds a run
    assert "already holds a run" in capsys.readouterr().err
    assert gt.main(["--resume", "--out", str(out)]) == 0
    assert "restarting the run its config.json defines" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "gvae" and metrics["beta"] == 4 and metrics["steps"] == 6


def test_a_run_folder_is_held_by_one_process(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import grouptc, sys, time\n"
                               f"lock = grouptc.RunFolderLock({str(out)!r}).__enter__()\nprint('held', flush=True)\n"
                               "time.sleep(600)"], cwd=HERE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert gt.main(["--model", "gvae", "--out", str(out), *BASE]) == 3
        assert f"is in use by process {holder.pid} on" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()  # kill -9: the OS drops the lock with the process
        holder.wait()
    assert gt.main(["--model", "gvae", "--out", str(out), *BASE]) == 0


def test_two_run_paper_sh_on_one_runs_dir_never_train_a_run_twice(tmp_path):
    # runs long enough (~10 s each) that the second script, whose start-up checks every command (a few seconds),
    # reaches the first run while the first script still trains it
    env = os.environ | {"STEPS": "160", "SEEDS": "0 1", "DATASETS": "dsprites_procedural", "ONLY_MODELS": "gvae",
                        "BASE_BETAS": "1", "GROUP_SIZES": "2", "BATCH_SIZE": "4", "EVAL_SAMPLES": "200",
                        "LOG_EVERY": "80",
                        "JOBS": "1", "RUNS_DIR": str(tmp_path / "runs"), "PYTHON": sys.executable,
                        "OMP_NUM_THREADS": "1"}  # two scripts share the cores (both cores each: oversubscribed)
    start = lambda: subprocess.Popen(["bash", "run_paper.sh"], cwd=HERE, env=env, stderr=subprocess.PIPE,
                                     text=True)  # noqa: E731
    first = start()
    deadline = time.time() + 120  # the second starts once the first is training its first run
    while not any("training " in p.read_text() for p in (tmp_path / "runs").rglob("*.log")):
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.2)
    second = start()
    errs = [p.communicate(timeout=600)[1] for p in (first, second)]
    runs = sorted((tmp_path / "runs" / "dsprites_procedural").iterdir())
    assert len(runs) == 2
    for run in runs:
        log = tmp_path / "runs" / "logs" / f"{run.name}.log"  # the output of the processes that ran it
        assert log.read_text().count("training ") == 1, run  # trained by one process only
        assert [r["step"] for r in gt.read_log(run / "log.csv")] == ["80", "160"]  # no interleaved rows
    assert "another process is training it" in errs[1]
    assert (tmp_path / "runs" / "results.md").exists()  # the last to see every run done summarises


def test_a_failed_download_removes_only_its_own_partial_file(tmp_path, monkeypatch):
    monkeypatch.setitem(gt.DOWNLOADS, gt.DSPRITES_NPZ, ("http://127.0.0.1:9/x.npz", "md5", "0" * 32))
    theirs = tmp_path / (gt.DSPRITES_NPZ + ".part")  # another program's download in progress
    theirs.write_bytes(b"someone else's bytes")
    with pytest.raises(gt.UserError):
        gt.load_dataset("dsprites", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [theirs.name]
    assert theirs.read_bytes() == b"someone else's bytes"


def test_resume_with_fewer_steps_than_trained_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert gt.main(["--model", "gvae", "--out", str(out), *BASE]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert gt.main(["--resume", "--out", str(out), "--steps", "3"]) == 2
    assert "--steps 3 is below the 6 steps" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert gt.main(["--resume", "--out", str(out)]) == 0  # finished: nothing to do, nothing rewritten
    assert "nothing to do" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_eval_only_never_replaces_good_metrics_with_nan(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert gt.main(["--model", "gvae", "--out", str(out), *BASE]) == 0
    good = (out / "metrics.json").read_bytes()
    assert gt.main(["--eval-only", "--out", str(out), "--eval-samples", "1"]) == 2
    assert "--eval-samples must be 0 (all points) or 100 .. 737,280" in capsys.readouterr().err
    original = gt.evaluate
    monkeypatch.setattr(gt, "evaluate", lambda *a: (lambda r: (r[0] | {"mig": float("nan")}, *r[1:]))(original(*a)))
    assert gt.main(["--eval-only", "--out", str(out), "--eval-samples", "500"]) == 2
    assert "nothing was written" in capsys.readouterr().err
    assert (out / "metrics.json").read_bytes() == good
    json.loads(good)  # strict JSON (no NaN tokens)


class _RunsCode:
    """Unpickling this object would create the folder `marker`: a stand-in for a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_crafted_checkpoint_runs_no_code(tmp_path, capsys):
    out = tmp_path / "run"
    assert gt.main(["--model", "gvae", "--out", str(out), *BASE]) == 0
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)  # what we write loads with weights_only
    marker = tmp_path / "pwned"
    torch.save(checkpoint | {"payload": _RunsCode(str(marker))}, out / "checkpoint.pt")
    for flags in (["--eval-only"], ["--resume", "--steps", "8"]):
        assert gt.main([*flags, "--out", str(out)]) == 2
        assert "could not read the checkpoint" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("broken", ["missing key", "wrong shape", "not a dict"])
def test_a_checkpoint_of_the_wrong_structure_is_a_clear_error(tmp_path, capsys, broken):
    out = tmp_path / "run"
    assert gt.main(["--model", "gvae", "--out", str(out), *BASE]) == 0
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    if broken == "missing key":
        del checkpoint["vae_opt"]
    elif broken == "wrong shape":
        checkpoint["vae"] = gt.VAE(1, 6).state_dict()
    else:
        checkpoint = [1, 2, 3]
    torch.save(checkpoint, out / "checkpoint.pt")
    capsys.readouterr()
    assert gt.main(["--eval-only", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "checkpoint" in err


def test_official_files_must_hold_the_official_grid_and_pixels(tmp_path, capsys):
    imgs, classes = tiny_dsprites_arrays()
    write_dsprites_npz(tmp_path / gt.DSPRITES_NPZ, imgs, classes)
    with pytest.raises(gt.UserError, match=r"factor sizes \(3, 2, 2, 3, 2\).*--allow-subgrid"):
        gt.load_dataset("dsprites", tmp_path)
    write_dsprites_npz(tmp_path / gt.DSPRITES_NPZ, imgs * 255, classes)  # a 0/255 file
    with pytest.raises(gt.UserError, match="0 or 1, found values up to 255"):
        gt.load_dataset("dsprites", tmp_path, allow_subgrid=True)
    write_dsprites_npz(tmp_path / gt.DSPRITES_NPZ, imgs, classes)
    argv = ["--dataset", "dsprites", "--data-dir", str(tmp_path), "--model", "gvae", *TINY, "--eval-samples", "0"]
    assert gt.main([*argv, "--out", str(tmp_path / "a")]) == 2
    assert "--allow-subgrid" in capsys.readouterr().err
    assert gt.main([*argv, "--out", str(tmp_path / "b"), "--allow-subgrid"]) == 0
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["factor_sizes"] == [3, 2, 2, 3, 2]  # a sub-grid run says so, and is labelled so in the summary
    assert gt.main(["--summarize", str(tmp_path / "b")]) == 0
    assert "| gvae (batch 4) (factor sizes 3,2,2,3,2) | 1 |" in (tmp_path / "b" / "results.md").read_text()
    other = tmp_path / "other"  # another sub-grid file: the run cannot go on with it, nor be evaluated on it
    other.mkdir()
    write_dsprites_npz(other / gt.DSPRITES_NPZ, *tiny_dsprites_arrays(sizes=(1, 3, 2, 2, 2, 2)))
    before = {f.name: f.read_bytes() for f in (tmp_path / "b").iterdir()}
    capsys.readouterr()
    for flags in (["--resume", "--steps", "9"], ["--eval-only"]):
        assert gt.main([*flags, "--out", str(tmp_path / "b"), "--data-dir", str(other)]) == 2
        err = capsys.readouterr().err
        assert "trained on data with factor sizes (3, 2, 2, 3, 2)" in err and "has (3, 2, 2, 2, 2)" in err, err
    assert {f.name: f.read_bytes() for f in (tmp_path / "b").iterdir()} == before  # nothing written


def test_bad_places_get_a_clear_message_before_anything_is_built(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    built = []
    monkeypatch.setattr(gt, "load_dataset", lambda *a, **k: built.append(a))
    cases = [(["--out", str(afile)], "is a file, not a folder"),
             (["--out", str(afile / "run")], "is a file, not a folder"),
             (["--device", "meta"], "unsupported device 'meta'"),
             (["--device", "xpu"], "unsupported device 'xpu'")]
    for flags, message in cases:
        assert gt.main(["--model", "gvae", *BASE, "--out", str(tmp_path / "run"), *flags]) == 2
        assert message in capsys.readouterr().err
    assert built == [] and afile.read_text() == "keep me"
    monkeypatch.undo()
    assert gt.main(["--model", "gvae", "--dataset", "dsprites", "--data-dir", str(afile), "--out",
                    str(tmp_path / "r2")]) == 2
    assert f"--data-dir {afile} is a file" in capsys.readouterr().err


def test_a_read_only_out_is_a_clear_error(tmp_path, monkeypatch, capsys):
    real_open = os.open

    def read_only(path, *a, **k):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(gt.os, "open", read_only)
    assert gt.main(["--model", "gvae", *BASE, "--out", str(tmp_path / "run")]) == 2
    assert "cannot write there (Read-only file system)" in capsys.readouterr().err


def test_a_full_disk_names_the_disk_and_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert gt.main(["--model", "gvae", *BASE, "--out", str(out)]) == 0
    good = (out / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def disk_fills_up(obj, f, *a, **k):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gt.torch, "save", disk_fills_up)
    assert gt.main(["--resume", "--out", str(out), "--steps", "9"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "MiB free" in err and str(out) in err
    assert (out / "checkpoint.pt").read_bytes() == good
    monkeypatch.setattr(gt.torch, "save", real_save)
    plt = gt._plt()
    monkeypatch.setattr(plt.Figure, "savefig", lambda self, f, **k: disk_fills_up(None, f))
    assert gt.main(["--eval-only", "--out", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.stat().st_size == 0]


def test_ctrl_c_during_evaluation_is_a_clear_message(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert gt.main(["--model", "gvae", *BASE, "--out", str(out)]) == 0
    good = (out / "metrics.json").read_bytes()

    def interrupted(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(gt, "mutual_info_and_entropy", interrupted)
    assert gt.main(["--eval-only", "--out", str(out)]) == 130
    assert "interrupted; the files in" in capsys.readouterr().err
    assert (out / "metrics.json").read_bytes() == good


def test_summary_skips_metrics_of_the_wrong_structure(tmp_path, capsys):
    out = tmp_path / "runs" / "good"
    assert gt.main(["--model", "gvae", *BASE, "--out", str(out)]) == 0
    steps_as_text = json.loads((out / "metrics.json").read_text()) | {"steps": "5"}
    for name, text in (("a", '{"mig": 0.1}'), ("b", "[1, 2]"), ("c", "not json"), ("d", json.dumps(steps_as_text))):
        (tmp_path / "runs" / name).mkdir()
        (tmp_path / "runs" / name / "metrics.json").write_text(text)
    assert gt.main(["--summarize", str(tmp_path / "runs")]) == 0
    err = capsys.readouterr().err
    assert err.count("skipping") == 4 and "'5', not a whole number" in err and "Traceback" not in err
    assert "| gvae (batch 4) | 1 |" in (tmp_path / "runs" / "results.md").read_text()


def test_retyping_the_default_content_factors_on_resume_is_accepted(tmp_path, capsys):
    out = tmp_path / "run"
    assert gt.main(["--model", "gvae", *BASE, "--out", str(out)]) == 0
    assert gt.main(["--resume", "--out", str(out), "--steps", "8", "--content-factors",
                    "orientation, shape,scale"]) == 0
    assert gt.main(["--resume", "--out", str(out), "--steps", "9", "--content-factors", "posX"]) == 2
    assert "--content-factors posX differs" in capsys.readouterr().err


def test_help_shows_every_meaningful_default(capsys):
    with pytest.raises(SystemExit):
        gt.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "A comma-separated list makes a sweep (default: 0)" in text  # --seed


def test_readme_says_how_to_avoid_the_cuda_download_before_the_setup_commands():
    text = (HERE / "README.md").read_text()
    assert text.index("download.pytorch.org/whl/cpu") < text.index("pip install -r requirements.txt")


def test_evaluation_on_every_point_shows_progress(tmp_path, monkeypatch, capsys):
    run = tiny_run(tmp_path, model="gvae")
    monkeypatch.setattr(type(run.data), "factor_sizes", (3, 2, 2, 4, 3))
    gt.evaluate(run.vae, run.data, run.content_factors, 5, 0)
    assert "encoding 144 points: 100.0%" in capsys.readouterr().err


def test_summary_prints_no_warnings(tmp_path, recwarn, real_figures):
    out = tmp_path / "runs" / "only"
    assert gt.main(["--model", "group_tcvae", *BASE, "--out", str(out)]) == 0  # no baseline: empty Figure 3(c)
    assert gt.main(["--summarize", str(tmp_path / "runs")]) == 0
    assert [str(w.message) for w in recwarn] == []


@pytest.mark.parametrize("env,message", [
    ({"STEPS": "3k"}, "STEPS must be a positive whole number"),
    ({"SEEDS": ""}, "SEEDS is set but empty"),
    ({"DATASETS": " "}, "DATASETS is set but empty"),
    ({"RUNS_DIR": "my runs"}, "RUNS_DIR must not contain spaces"),
    ({"TC_LEVELS": "inter most"}, "unknown level 'most'"),
    ({"DATASETS": "mnist"}, "unknown data set 'mnist'"),
    ({"OMP_NUM_THREADS": "all"}, "OMP_NUM_THREADS must be a positive whole number"),
    ({"METRICS": "mig, sap"}, "METRICS is one comma list without spaces"),
    ({"SEEDS": "9" * 19}, "SEEDS must be whole numbers (up to 15 digits)"),
    ({"ONLY_MODELS": "ada_gvae", "ADA_MODELS": "none"}, "the grid is empty: the lists give no run of ONLY_MODELS"),
    # the rest by the program's own checks, on every command of the grid
    ({"EVAL_SAMPLES": "50", "DATASETS": "dsprites_procedural"}, "refused: --eval-samples must be 0 (all points)"),
    ({"DEVICE": "gpu"}, "refused: --device: unsupported device 'gpu'"),
    ({"K": "7", "PAIRS": "k_factors"}, "refused: --k must be rnd or 1 .. 4"),
])
def test_run_paper_checks_its_settings_up_front(tmp_path, env, message):
    done = subprocess.run(["bash", "run_paper.sh"], cwd=HERE, capture_output=True, text=True,
                          env=os.environ | {"RUNS_DIR": str(tmp_path / "runs"), "DRY_RUN": "1"} | env)
    assert done.returncode == 2 and message in done.stderr and done.stdout == ""
    assert not (tmp_path / "runs").exists()


def test_run_paper_takes_relative_folders_from_where_it_is_run(tmp_path):
    done = subprocess.run(["bash", str(HERE / "run_paper.sh")], cwd=tmp_path, capture_output=True, text=True,
                          check=True, env=os.environ | {"RUNS_DIR": "mine", "DATA_DIR": "d", "DRY_RUN": "1"})
    first = done.stdout.splitlines()[0]
    assert f"--data-dir {tmp_path}/d " in first and f"--out {tmp_path}/mine/dsprites/" in first


def test_a_stop_that_arrives_twice_at_once_is_one_stop_and_another_later_stops_at_once(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(gt.time, "monotonic", lambda: clock[0])
    stop = gt.StopRequest()
    stop(signal.SIGTERM, None)
    clock[0] += 0.01
    stop(signal.SIGINT, None)  # the same stop, passed on by run_paper.sh or sent to every process by a batch system
    assert stop.requested
    clock[0] += 2
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C, seconds later
        stop(signal.SIGINT, None)


def kill_session(sid, sig):
    """Signal every process of session `sid` (a script's, started with start_new_session: its workers have process
    groups of their own)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) == sid:
                os.kill(int(stat.parent.name), sig)


@pytest.mark.parametrize("how", ["ctrl-c", "kill -INT", "kill -TERM", "cancel", "kill -TERM at start-up"])
def test_ctrl_c_stops_the_whole_run_paper_grid_after_a_checkpoint(tmp_path, how):
    env = os.environ | {"STEPS": "100000", "SEEDS": "0 1", "DATASETS": "dsprites_procedural", "ONLY_MODELS": "gvae",
                        "GVAE_BETAS": "1", "GROUP_SIZES": "2", "BATCH_SIZE": "4", "EVAL_SAMPLES": "100",
                        "CHECKPOINT_EVERY": "2", "LOG_EVERY": "2", "JOBS": "1", "RUNS_DIR": str(tmp_path / "runs"),
                        "PYTHON": sys.executable}
    # A terminal's Ctrl-C: SIGINT to the script's process group; kill: a signal to the script's process alone; at
    # start-up: while the first run's Python starts, the script run in the background of another (SIGINT ignored)
    early = how.endswith("start-up")
    grid = subprocess.Popen(["bash", "run_paper.sh"], cwd=HERE, env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(
                                signal.SIGINT, signal.SIG_IGN if early else signal.SIG_DFL))
    log = tmp_path / "runs" / "logs" / "gvae_dsprites_procedural_beta1_gamma0_gs2_tc-inter_bs4_seed0.log"
    try:
        deadline = time.time() + 120
        while not (log.exists() and (early or "step " in log.read_text())) and time.time() < deadline:
            time.sleep(0.05)
        if how == "ctrl-c":
            os.killpg(grid.pid, signal.SIGINT)
        elif how == "cancel":  # a batch system's (SLURM's scancel, systemd's stop): SIGTERM to every process
            kill_session(grid.pid, signal.SIGTERM)
        else:
            os.kill(grid.pid, signal.SIGINT if how == "kill -INT" else signal.SIGTERM)
        err = grid.communicate(timeout=120)[1]
    finally:  # nothing left running, whatever happened
        kill_session(grid.pid, signal.SIGKILL)
    assert grid.returncode == 130 and "interrupted; each run checkpoints" in err and "stop  " in err, err
    assert early != ("stopped at step" in log.read_text())  # it checkpointed; at start-up it had nothing to save
    assert early != (log.parent.parent / "dsprites_procedural" / log.stem / "checkpoint.pt").exists()
    assert not log.with_name(log.name.replace("seed0", "seed1")).exists()  # the grid's next run never started


def test_the_gpu_grid_script_runs_whole_on_the_cpu(tmp_path):
    """benchmarks/gpu_grid.sh at tiny sizes: calibration, training, evaluation, summary, and the files that come back
    from a device command; run again, it keeps its plan (device minutes are scarce: a broken script wastes them)."""
    out = tmp_path / "out"
    env = os.environ | {"DEVICE": "cpu", "CAL_STEPS": "1", "WARMUP": "1", "QUANTUM": "2", "MAX_STEPS": "2",
                        "TRAIN_S": "5", "SEEDS": "0", "GTC_BETAS": "10", "GTC_GAMMAS": "8", "BASE_BETAS": "1",
                        "TC_LEVELS": "full", "EVAL_SAMPLES": "100", "RUNS_DIR": str(tmp_path / "runs"),
                        "OUT": str(out), "PYTHON": sys.executable}
    run = lambda **more: subprocess.run(["bash", "benchmarks/gpu_grid.sh"], cwd=HERE, env=env | more,  # noqa
                                        capture_output=True, text=True, timeout=600)
    done = run()
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_grid.tar.gz", "gpu_grid.txt", "results.md"]
    report = (out / "gpu_grid.txt").read_text()
    assert "all at once" in report and "STEPS=2 fit" in report and "3 of 3 runs evaluated" in report
    with tarfile.open(out / "gpu_grid.tar.gz") as tar:
        names = tar.getnames()
    assert sum(n.endswith("metrics.json") for n in names) == 3 and not any(n.endswith(".pt") for n in names)
    assert "| group_tcvae (TC full) | 1 | 2 |" in (out / "results.md").read_text()
    again = run(DEADLINE_S="1")  # its plan read back, not measured again; no time left to train: it says so
    assert again.returncode == 2 and "STEPS=2 MODE=" in again.stderr and "continuing" in again.stderr
    assert "no time left before DEADLINE_S=1" in again.stderr and "calibration" not in again.stderr


def test_slurm_array_task_runs_one_entry_of_the_list(tmp_path):
    env = os.environ | {"STEPS": "2", "SEEDS": "0", "DATASETS": "dsprites_procedural", "TCVAE_BETAS": "10",
                        "TCVAE_GAMMAS": "1", "BASE_BETAS": "1", "GROUP_SIZES": "2", "TC_LEVELS": "inter",
                        "ABLATION_GAMMA": "1", "ADA_MODELS": "none",
                        "BATCH_SIZE": "4", "EVAL_SAMPLES": "100", "RUNS_DIR": str(tmp_path / "runs"),
                        "PYTHON": sys.executable}
    listed = subprocess.run(["bash", "run_paper.sh"], cwd=HERE, env=env | {"DRY_RUN": "1"}, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    count = subprocess.run(["bash", "run_paper.sh"], cwd=HERE, env=env | {"COUNT": "1"}, capture_output=True,
                           text=True, check=True).stdout
    assert int(count) == len(listed) == 3
    task = subprocess.run(["bash", "run_paper.sh"], cwd=HERE, env=env | {"SLURM_ARRAY_TASK_ID": "1",
                          "SLURM_SUBMIT_DIR": str(HERE)}, capture_output=True, text=True)
    assert task.returncode == 0, task.stderr
    done = [p.parent.name for p in (tmp_path / "runs").rglob("metrics.json")]
    assert done == [listed[1].split("--out ")[1].split()[0].rsplit("/", 1)[1]]  # entry 1, and only it
    assert not (tmp_path / "runs" / "results.md").exists()  # the summary is its own step
    bad = subprocess.run(["bash", "run_paper.sh"], cwd=HERE, env=env | {"SLURM_ARRAY_TASK_ID": "3"},
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not an entry (0..2)" in bad.stderr


# ------------------------------------------------------------------------------------------------ sweeps
def without_time(rows):
    return [{k: float(v) for k, v in r.items() if k != "ms_per_step"} for r in rows]


def assert_logs_close(a, b, rel=1e-4):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ra:
            assert math.isclose(ra[key], rb[key], rel_tol=rel, abs_tol=1e-6), (key, ra[key], rb[key])


@pytest.mark.parametrize("model,tc_level,batched", [
    ("group_tcvae", "inter", False),  # the other TC levels differ in tc_blocks() alone, checked on their own
    ("gvae", "inter", False),  # MLVAE differs from GVAE in group_objective() alone, checked on its own
    ("group_tcvae", "inter", True), ("gvae", "inter", True),  # torch.func.vmap, the GPU's path, checked on the CPU
    ("ada_mlvae", "inter", True),
])
def test_a_sweep_member_is_the_same_run_as_alone(tmp_path, monkeypatch, model, tc_level, batched):
    monkeypatch.setattr(gt.Sweep, "BATCHED", batched)
    pairs = ["--pairs", "k_factors"] if model.startswith("ada") else []
    # An Ada model's shared dims are a threshold: vmap's grouped convolutions differ from the loop's by ~1e-8, which
    # flips a dim whose KL sits at the midpoint now and then (once in the first 6 steps on an AMD EPYC; on an Intel
    # Xeon the MI matrices after 3 steps differ by 0.008), and the runs part. Through vmap it is checked over 2 steps.
    short = ["--steps", "2"] if model.startswith("ada") and batched else []
    argv = ["--model", model, "--tc-level", tc_level, *pairs, *BASE, *short]
    assert gt.main([*argv, "--seed", "0,3", "--beta", "2,9", "--out", str(tmp_path / "sweep")]) == 0
    members = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    name = f"{model}_dsprites_procedural_beta9_gamma{8 if model == 'group_tcvae' else 0}_gs2_tc-{tc_level}"
    assert len(members) == 4 and name + ("_pairs-k_factors-krnd" if pairs else "") + "_bs4_seed3" in members
    alone = tmp_path / "alone"
    assert gt.main([*argv, "--seed", "3", "--beta", "9", "--out", str(alone)]) == 0
    member = tmp_path / "sweep" / next(m for m in members if m.startswith(f"{model}_dsprites_procedural_beta9_")
                                       and m.endswith("seed3"))
    assert_logs_close(without_time(gt.read_log(member / "log.csv")), without_time(gt.read_log(alone / "log.csv")))
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (member, alone))
    assert np.allclose(ma["mi_matrix"], mb["mi_matrix"], atol=2e-3)
    config = json.loads((member / "config.json").read_text())
    assert (config["seed"], config["beta"], config["out"]) == (3, 9.0, str(member))
    for name in FIGURES:  # each member's own figures (how they look: test_every_model_trains_and_writes_every_output)
        assert (member / name).stat().st_size > 0


def test_a_sweep_member_is_a_run_in_its_own_right(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    argv = ["--model", "gvae", *BASE, "--seed", "0,1", "--out", str(sweep)]
    assert gt.main(argv) == 0
    member = sweep / "gvae_dsprites_procedural_beta1_gamma0_gs2_tc-inter_bs4_seed1"
    checkpoint = torch.load(member / "checkpoint.pt", weights_only=True)
    alone = tmp_path / "alone"
    assert gt.main(["--model", "gvae", *BASE, "--seed", "1", "--out", str(alone)]) == 0
    single = torch.load(alone / "checkpoint.pt", weights_only=True)
    flat = lambda c: {k: tuple(v.shape) for k, v in c["vae"].items()}  # noqa: E731
    assert set(checkpoint) == set(single) and flat(checkpoint) == flat(single)
    assert checkpoint["vae_opt"]["state"].keys() == single["vae_opt"]["state"].keys()
    assert gt.main(["--eval-only", "--out", str(member), "--eval-samples", "400"]) == 0
    assert json.loads((member / "metrics.json").read_text())["eval_samples"] == 400
    assert gt.main(["--resume", "--out", str(member), "--steps", "9"]) == 0  # continued alone
    assert [r["step"] for r in gt.read_log(member / "log.csv")] == ["3", "6", "9"]
    assert gt.main(argv) == 2 and "already holds a run" in capsys.readouterr().err
    assert gt.main(["--summarize", str(sweep)]) == 0
    table = (sweep / "results.md").read_text()  # seed 1 now stands at 9 steps: a row of its own
    assert "| gvae (batch 4) | 1 | 0 | 6 | 1 |" in table and "| gvae (batch 4) | 1 | 0 | 9 | 1 |" in table


def test_a_sweep_resumes_as_if_never_interrupted(tmp_path):
    argv = ["--model", "group_tcvae", "--dataset", "dsprites_procedural", "--steps", "8", "--batch-size", "4",
            "--log-every", "2", "--checkpoint-every", "100", "--eval-samples", "200", "--device", "cpu",
            "--seed", "0,1"]
    assert gt.main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert run_main_interrupted_at(4, argv + ["--out", str(tmp_path / "b")]) == 130
    assert gt.main(["--resume", "--out", str(tmp_path / "b")]) == 0  # every unfinished run, together
    for member in sorted((tmp_path / "a").iterdir()):
        if member.is_dir():
            a, b = (gt.read_log(tmp_path / r / member.name / "log.csv") for r in "ab")
            assert without_time(a) == without_time(b)
            assert [r["step"] for r in a] == ["2", "4", "6", "8"]


@pytest.mark.parametrize("first,then", [(True, False)])  # the reverse loads the same files the other way round
def test_a_sweep_resumes_in_the_other_layout(tmp_path, monkeypatch, first, then):
    """Interrupted while batched (vmap over the stacked weights, one Adam state per stacked tensor), resumed looping
    (each run's slices and their Adam states), and the reverse: a checkpoint is a run's, whatever trained it."""
    argv = ["--model", "group_tcvae", "--dataset", "dsprites_procedural", "--steps", "8", "--batch-size", "4",
            "--log-every", "2", "--checkpoint-every", "100", "--eval-samples", "200", "--device", "cpu",
            "--seed", "0,1"]
    monkeypatch.setattr(gt.Sweep, "BATCHED", first)
    assert gt.main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert run_main_interrupted_at(4, argv + ["--out", str(tmp_path / "b")]) == 130
    monkeypatch.setattr(gt.Sweep, "BATCHED", then)
    assert gt.main(["--resume", "--out", str(tmp_path / "b")]) == 0
    for seed in (0, 1):
        name = f"group_tcvae_dsprites_procedural_beta10_gamma8_gs2_tc-inter_bs4_seed{seed}"
        a, b = (gt.read_log(tmp_path / r / name / "log.csv") for r in "ab")
        assert [r["step"] for r in b] == ["2", "4", "6", "8"]
        assert_logs_close(without_time(a), without_time(b))


def test_a_run_whose_loss_goes_nan_stops_alone(tmp_path, monkeypatch, capsys):
    original = gt.group_objective

    def poisoned(model, vae, D, x, shares, beta, gamma, *rest, **kw):
        loss, terms, z = original(model, vae, D, x, shares, beta, gamma, *rest, **kw)
        poisoned.calls += 1
        if float(beta) == 3 and poisoned.calls > 8:  # the beta-3 run, from its 5th step on
            loss = loss * float("nan")
        return loss, terms, z
    poisoned.calls = 0

    monkeypatch.setattr(gt, "group_objective", poisoned)
    sweep = tmp_path / "sweep"
    code = gt.main(["--model", "gvae", "--dataset", "dsprites_procedural", "--steps", "8", "--batch-size", "4",
                    "--log-every", "2", "--checkpoint-every", "2", "--eval-samples", "200", "--device", "cpu",
                    "--beta", "1,3", "--out", str(sweep)])
    assert code == 2
    err = capsys.readouterr().err
    bad, good = (sweep / f"gvae_dsprites_procedural_beta{b}_gamma0_gs2_tc-inter_bs4_seed0" for b in (3, 1))
    assert f"{bad}: the loss became NaN" in err and "the other runs go on" in err
    assert torch.load(bad / "checkpoint.pt", weights_only=True)["step"] == 4  # its last good checkpoint
    assert "NaN or infinite" in (bad / "train.log").read_text() and not (bad / "metrics.json").exists()
    assert json.loads((good / "metrics.json").read_text())["steps"] == 8  # the other run trained to the end
    assert [r["step"] for r in gt.read_log(good / "log.csv")] == ["2", "4", "6", "8"]
    # Resumed further, the runs stand at steps 4 and 8 and train one set after the other, each alone: the NaN run
    # again stops alone, and the other one still trains
    assert gt.main(["--resume", "--out", str(sweep), "--steps", "10"]) == 2
    assert (bad / "train.log").read_text().count("NaN or infinite") == 2
    assert json.loads((good / "metrics.json").read_text())["steps"] == 10


def test_sweep_lists_are_checked(tmp_path, capsys):
    for flags, message in ((["--seed", "0,0"], "distinct int values"), (["--beta", "1,x"], "float values"),
                           (["--beta", "1,-2"], "--beta must be a non-negative")):
        with pytest.raises(SystemExit) if "values" in message else contextlib.nullcontext():
            code = gt.main(["--model", "gvae", *BASE, *flags, "--out", str(tmp_path / "s")])
            assert code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").rglob("config.json"))


def test_summary_reports_each_factors_gaps(tmp_path):
    """results.md's per-factor tables: MIG gap and group-MIG gap over H(v), per setting, from the MI matrices."""
    names = ["shape", "scale", "orientation", "posX", "posY"]
    H = np.array([1.0, 1.5, 3.0, 3.4, 3.4])
    rng = np.random.default_rng(0)
    mis = []
    for seed in (0, 1):
        mi = rng.uniform(0, 0.5, (10, 5))
        mis.append(mi)
        m = {"mig": 0.1, "group_mig": 0.2, "mi_matrix": mi.tolist(), "factor_entropy": H.tolist(),
             "factor_names": names, "content_factors": names[:3], "content_latents": [5, 6, 7, 8, 9],
             "model": "gvae", "dataset": "dsprites_procedural", "beta": 4.0, "gamma": 0.0, "steps": 10,
             "seed": seed, "group_size": 2, "tc_level": "inter"} | ({"modularity": 0.75} if seed else {})
        (tmp_path / f"r{seed}").mkdir()
        (tmp_path / f"r{seed}" / "metrics.json").write_text(json.dumps(m))
    assert gt.main(["--summarize", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text()
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


# ------------------------------------------------------------------------------------- one run, one folder (#19)
def fake_run(folder, **flags):
    """A folder that holds a run's config.json (no training): what the folder checks look at."""
    folder.mkdir(parents=True)
    config = gt.DEFAULTS | {"model": "gvae", "dataset": "dsprites_procedural", "beta": 1.0, "gamma": 0.0,
                            "seed": 0, "out": str(folder)} | flags
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_run_name_is_every_run_defining_flag_exactly():
    base = gt.expand(gt.parse_args(["--model", "gvae", "--dataset", "dsprites_procedural", "--device", "cpu"]))[0]
    name = lambda **kw: gt.run_name(argparse.Namespace(**(vars(base) | kw)))  # noqa: E731
    assert name() == "gvae_dsprites_procedural_beta1_gamma0_gs2_tc-inter_seed0"
    assert name(beta=0.1) != name(beta=0.1000001) and name(beta=0.1) == name(beta=float("0.10"))
    variants = [{"model": "mlvae"}, {"dataset": "shapes3d_procedural", "content_factors": None}, {"beta": 2.0},
                {"gamma": 1.0}, {"group_size": 3}, {"tc_level": "full"}, {"batch_size": 64}, {"latent_dim": 12},
                {"content_dims": 4}, {"content_factors": "shape,scale"}, {"seed": 1}, {"pairs": "k_factors"},
                {"pairs": "k_factors", "k": 2}]
    names = [name(**v) for v in variants]
    assert len(set(names + [name()])) == len(variants) + 1  # no two settings share a name
    assert name(content_factors="orientation,shape,scale") == name()  # the default split, typed in another order
    assert name(k=3) == name()  # k means nothing on group pairs
    assert all(gt.looks_like_run_name(n) for n in names) and not gt.looks_like_run_name("gvae-dsprites-seed0")
    assert not gt.looks_like_run_name("gvae_mytest_seed0")  # a user's own name, and earlier versions' names:
    assert not gt.looks_like_run_name("gvae_beta1_gamma0_gs2_tc-inter_seed0")  # not checked against settings


def test_a_folder_is_a_run_or_a_parent_of_runs_never_both(tmp_path, capsys):
    run = fake_run(tmp_path / "run")
    sweep = ["--model", "gvae", *BASE, "--seed", "0,1"]
    assert gt.main([*sweep, "--out", str(run)]) == 2  # a sweep into a run's folder
    assert "is a run's folder" in capsys.readouterr().err
    assert gt.main([*sweep, "--out", str(run / "inner")]) == 2 and not (run / "inner").exists()  # inside a run
    assert "inside one" in capsys.readouterr().err
    parent = tmp_path / "parent"
    fake_run(parent / "gvae_dsprites_procedural_beta1_gamma0_gs2_tc-inter_bs4_seed0", batch_size=4)
    for argv in (["--model", "gvae", *BASE], ["--resume", "--model", "gvae", *BASE]):  # a run into a sweep's folder
        assert gt.main([*argv, "--out", str(parent)]) == 2
        assert "holds runs in folders below it" in capsys.readouterr().err
    assert gt.main(["--model", "gvae", *BASE, "--out", str(run / "sub")]) == 2  # a run inside a run
    assert "inside the run folder" in capsys.readouterr().err and not (run / "sub").exists()
    assert sorted(p.name for p in parent.iterdir()) == ["gvae_dsprites_procedural_beta1_gamma0_gs2_tc-inter_bs4_seed0"]
    assert not (parent / "config.json").exists() and not (run / "checkpoint.pt").exists()


def test_resume_on_a_parent_continues_the_runs_there_and_refuses_what_names_none(tmp_path, capsys):
    argv = ["--model", "gvae", "--dataset", "dsprites_procedural", "--steps", "8", "--batch-size", "4",
            "--log-every", "2", "--checkpoint-every", "100", "--eval-samples", "200", "--device", "cpu"]
    sweep = tmp_path / "sweep"
    assert run_main_interrupted_at(4, [*argv, "--seed", "0,1", "--out", str(sweep)]) == 130
    members = {s: sweep / f"gvae_dsprites_procedural_beta1_gamma0_gs2_tc-inter_bs4_seed{s}" for s in (0, 1)}
    step = lambda s: torch.load(members[s] / "checkpoint.pt", weights_only=True)["step"]  # noqa: E731
    for flags, message in ((["--tc-level", "full"], "no run below"), (["--seed", "5"], "no run below"),
                           (["--model", "mlvae", "--seed", "0,1"], "none of the 2 runs this command names"),
                           (["--model", "mlvae"], "holds runs in folders below it")):
        assert gt.main(["--resume", "--out", str(sweep), *flags]) == 2
        assert message in capsys.readouterr().err
    assert (step(0), step(1)) == (4, 4)
    assert gt.main(["--resume", "--out", str(sweep), "--seed", "0"]) == 0  # selects seed 0, drops nothing
    assert (step(0), step(1)) == (8, 4) and not (members[1] / "metrics.json").exists()
    train_log = (members[0] / "train.log").read_text()
    assert "resumed at step 4" in train_log and train_log.count("step 4/8") == 1  # no repeated lines
    assert gt.main(["--resume", "--out", str(sweep)]) == 0  # every unfinished run there: seed 1
    assert (step(0), step(1)) == (8, 8)
    assert "is finished" in capsys.readouterr().err
    assert gt.main(["--resume", "--out", str(sweep), "--model", "gvae", "--seed", "0,1,2", *argv[2:]]) == 0
    assert json.loads((sweep / "gvae_dsprites_procedural_beta1_gamma0_gs2_tc-inter_bs4_seed2" / "metrics.json")
                      .read_text())["steps"] == 8  # named anew: the finished ones kept, seed 2 started


def test_a_foreign_run_in_a_sweeps_folder_is_refused_before_any_step(tmp_path, capsys):
    argv = ["--model", "gvae", *BASE]
    other = tmp_path / "other"
    assert gt.main([*argv, "--tc-level", "full", "--seed", "1", "--out", str(other)]) == 0
    sweep = tmp_path / "sweep"
    member = sweep / "gvae_dsprites_procedural_beta1_gamma0_gs2_tc-inter_bs4_seed1"
    shutil.copytree(other, member)  # a run of other settings, under this sweep's name for its seed-1 run
    for command in ([*argv, "--seed", "0,1", "--resume"], ["--resume"]):
        assert gt.main([*command, "--out", str(sweep)]) == 2
        assert "not the one its name says" in capsys.readouterr().err
    assert sorted(p.name for p in sweep.iterdir()) == [member.name]  # the seed-0 run was not started either
    assert (member / "checkpoint.pt").read_bytes() == (other / "checkpoint.pt").read_bytes()


def test_finished_means_trained_to_its_steps_and_evaluated_there(tmp_path):
    runs = tmp_path / "runs"
    name = "gvae_dsprites_procedural_beta1_gamma0_gs2_tc-inter_bs4_seed0"
    out = runs / "dsprites_procedural" / name
    argv = ["--model", "gvae", "--dataset", "dsprites_procedural", "--steps", "4", "--batch-size", "4",
            "--log-every", "2", "--checkpoint-every", "2", "--eval-samples", "200", "--device", "cpu",
            "--out", str(out)]
    assert run_main_interrupted_at(2, argv) == 130
    assert gt.main(["--eval-only", "--out", str(out)]) == 0  # as the interrupt message suggests
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    env = os.environ | {"STEPS": "4", "SEEDS": "0", "DATASETS": "dsprites_procedural", "ONLY_MODELS": "gvae",
                        "BASE_BETAS": "1", "GROUP_SIZES": "2", "BATCH_SIZE": "4", "EVAL_SAMPLES": "200",
                        "LOG_EVERY": "2", "CHECKPOINT_EVERY": "2", "RUNS_DIR": str(runs), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "run_paper.sh"], cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "start" in done.stderr, done.stderr[-2000:]  # not taken for finished
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    assert [r["step"] for r in gt.read_log(out / "log.csv")] == ["2", "4"]
    table = (runs / "results.md").read_text()
    assert "# Results: 1 runs" in table and "| gvae (batch 4) | 1 | 4 |" in table


def test_the_summary_pools_only_comparable_runs_and_counts_each_once(tmp_path, capsys):
    names = ["shape", "scale", "orientation", "posX", "posY"]
    rng = np.random.default_rng(0)

    def metrics(folder, config=None, **kw):
        m = {"mig": float(rng.uniform(0, 0.3)), "group_mig": 0.1, "mi_matrix": rng.uniform(0, 1, (10, 5)).tolist(),
             "factor_entropy": [1.0, 1.7, 3.6, 3.4, 3.4], "factor_names": names, "content_factors": names[:3],
             "content_latents": [5, 6, 7, 8, 9], "model": "gvae", "dataset": "dsprites_procedural", "beta": 1.0,
             "gamma": 0.0, "steps": 10, "seed": 0, "group_size": 2, "tc_level": "inter", "batch_size": 32} | kw
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(m))
        if config is not None:
            (folder / "config.json").write_text(json.dumps({k: m[k] for k in ("model", "dataset", "beta", "gamma",
                                                                              "seed")} | config))
    metrics(tmp_path / "a")
    metrics(tmp_path / "copy_of_a")  # the same run in two folders
    metrics(tmp_path / "b", steps=20, sap=0.25, sap_matrix=rng.uniform(0, 1, (10, 5)).tolist())
    metrics(tmp_path / "b2", steps=20, seed=1)  # a row's second run, scored without SAP
    metrics(tmp_path / "c", batch_size=64)
    metrics(tmp_path / "d", content_factors=["shape", "posX"], content_latents=[8, 9])
    metrics(tmp_path / "short", config={"steps": 400}, steps=239)  # evaluated halfway
    fake_run(tmp_path / "waiting", steps=10, batch_size=32)
    fake_run(tmp_path / "other_data", steps=10, dataset="shapes3d_procedural")  # its data set: none finished
    assert gt.main(["--summarize", str(tmp_path)]) == 0
    err, table = capsys.readouterr().err, (tmp_path / "results.md").read_text()
    assert "holds the same run as" in err and "leaving out" in err and "239 of its 400" in err
    assert "other_data: not evaluated yet" in err
    assert "## shapes3d_procedural\n\nNo run finished yet. Unfinished: gvae, beta 1, gamma 0, 10 steps: 1 run." in table
    shutil.rmtree(tmp_path / "other_data")
    assert "the figures show the 2 runs of 20 steps, not the 3 shorter ones" in err
    assert "# Results: 5 runs" in table and "(3 more unfinished)" in table
    assert "0.250 (1 of 2 runs)" in table  # a score only some of a row's runs have says so
    for row in ("| gvae | 1 | 10 |", "| gvae | 2 | 20 |", "| gvae (batch 64) | 1 | 10 |",
                "| gvae (z 10, z_c 2) (content shape,posX) | 1 | 10 |"):
        assert row in table, row
    assert "Unfinished (not counted above): gvae, beta 1, gamma 0, 10 steps: 1 run; gvae, beta 1, gamma 0, 400 " \
           "steps: 1 run." in table
    assert "| model | beta | gamma | steps | c: shape | \\c: scale |" in table  # the other split's own header
    shapes = tmp_path / "on_shapes3d"  # the same settings and seed on another data set: another run
    metrics(shapes, dataset="shapes3d_procedural", factor_names=list(gt.SHAPES3D_FACTORS),
            mi_matrix=rng.uniform(0, 1, (10, 6)).tolist(), factor_entropy=[2.3] * 6,
            content_factors=list(gt.SHAPES3D_CONTENT))
    assert gt.main(["--summarize", str(tmp_path)]) == 0
    assert "## shapes3d_procedural" in (tmp_path / "results.md").read_text()
    assert gt.main(["--summarize", str(shapes)]) == 0  # one run's folder summarises that run
    assert "# Results: 1 runs" in (shapes / "results.md").read_text()
    shutil.rmtree(shapes)
    for f in (tmp_path / "results.md", *tmp_path.glob("*_shapes3d_procedural.png")):
        f.unlink()
    for other in ("a", "copy_of_a", "b", "b2", "c", "d"):
        m = json.loads((tmp_path / other / "metrics.json").read_text())
        (tmp_path / other / "metrics.json").write_text(json.dumps(m | {"model": "group_tcvae", "gamma": 8.0}))
    assert gt.main(["--summarize", str(tmp_path)]) == 0  # no baseline's runs: no Figure 3(b) or 3(c) at all
    assert not list(tmp_path.glob("figure3[bc]_*.png")) and (tmp_path / "figure4_dsprites_procedural.png").exists()


@pytest.mark.parametrize("flags,message", [
    (["--seed", str(2 ** 63)], "--seed must be a whole number from 0"),
    (["--eval-samples", "2000000000"], "--eval-samples must be 0 (all points) or 100 .. 737,280"),
    (["--eval-samples", "50"], "--eval-samples must be 0 (all points) or 100"),
    (["--beta", "1e39"], "a float32 holds"),
    (["--content-factors", "shape,scael"], "unknown factor 'scael'"),
])
def test_a_sweep_is_refused_before_any_folder_is_written(tmp_path, capsys, flags, message):
    assert gt.main(["--model", "gvae", *BASE, "--seed", "0,1", *flags, "--out", str(tmp_path / "s")]) in (2,)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_sweep_that_cannot_fit_is_refused_with_how_many_would(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gt, "available_memory", lambda device: 2 ** 30)  # 1 GiB free
    assert gt.main(["--model", "group_tcvae", *BASE, "--seed", ",".join(map(str, range(200))),
                    "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "200 runs trained together need about" in err and "would fit" in err and not (tmp_path / "s").exists()


def test_a_failed_checkpoint_write_is_a_message_and_keeps_the_last_good_one(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["--model", "gvae", *BASE, "--out", str(out)]
    assert run_main_interrupted_at(3, argv) == 130
    good = (out / "checkpoint.pt").read_bytes()

    def full_disk(obj, f, *a, **kw):
        raise RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed")
    monkeypatch.setattr(torch, "save", full_disk)
    assert gt.main(["--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"could not write or read {out / 'checkpoint.pt'}" in err and "file write failed" in err
    assert (out / "checkpoint.pt").read_bytes() == good and not list(out.glob(".*.tmp"))


def test_a_resume_drops_a_cut_log_row_and_orphan_files(tmp_path, real_figures):
    out = tmp_path / "run"
    argv = ["--model", "gvae", *BASE, "--out", str(out)]
    assert run_main_interrupted_at(3, argv) == 130
    with open(out / "log.csv", "a") as f:
        f.write("6,27")  # a row a kill cut short (no newline)
    (out / ".checkpoint.pt.99999.tmp").write_bytes(b"half a checkpoint")
    assert gt.main(["--resume", "--out", str(out)]) == 0
    assert [r["step"] for r in gt.read_log(out / "log.csv")] == ["3", "6"]
    assert not list(out.glob(".*.tmp")) and (out / "training_curves.png").stat().st_size > 5_000
    with open(out / "log.csv", "a") as f:
        f.write("9,1,2\n")  # a cut row inside the file: the figures leave it out
    assert gt.main(["--eval-only", "--out", str(out)]) == 0


def test_evaluating_nan_weights_says_so_and_keeps_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    assert gt.main(["--model", "gvae", *BASE, "--out", str(out)]) == 0
    good = (out / "metrics.json").read_bytes()
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    for t in checkpoint["vae"].values():
        t.fill_(float("nan"))
    torch.save(checkpoint, out / "checkpoint.pt")
    assert gt.main(["--eval-only", "--out", str(out)]) == 2
    assert "NaN or infinite codes" in capsys.readouterr().err
    assert (out / "metrics.json").read_bytes() == good


def test_what_a_person_sees(tmp_path, capsys, real_figures):
    sweep = tmp_path / "sweep"
    assert gt.main(["--model", "gvae", *BASE, "--seed", "0,1", "--log-every", "100", "--out", str(sweep)]) == 0
    err = capsys.readouterr().err
    assert "(first step: includes start-up)" in err  # a progress line long before the first --log-every
    member = sweep / "gvae_dsprites_procedural_beta1_gamma0_gs2_tc-inter_bs4_seed1"
    metrics = json.loads((member / "metrics.json").read_text())
    assert gt.figure_title(metrics) == "gvae (batch 4) on dsprites_procedural: beta 1, gamma 0, seed 1, 6 steps"
    for name in FIGURES:  # written before metrics.json, the mark of a finished run
        assert (member / name).stat().st_mtime <= (member / "metrics.json").stat().st_mtime
    rows = gt.read_log(member / "log.csv")
    assert len(rows) == 1  # one row (at step 6): the curves show it as a point


def test_run_paper_refuses_duplicates_and_a_bad_mib_per_run():
    for env, message in (({"BASE_BETAS": "1 1.0"}, "BASE_BETAS lists '1' twice"),
                         ({"SEEDS": "0 1 0"}, "SEEDS lists '0' twice"),
                         ({"TCVAE_BETAS": "0.1 0.10"}, "TCVAE_BETAS lists '0.1' twice"),
                         ({"MIB_PER_RUN": "lots"}, "MIB_PER_RUN must be a positive whole number")):
        done = subprocess.run(["bash", "run_paper.sh"], cwd=HERE, env=os.environ | env | {"DRY_RUN": "1"},
                              capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr, (env, done.stderr)


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
    got = gt.dci_from_importance(R)
    assert got == pytest.approx((d, c), abs=1e-6)


def test_dci_weights_codes_by_importance():
    """A code with no importance does not count in D; one spread over two factors lowers it by its share."""
    R = np.array([[1.0, 0.0], [0.0, 0.0], [0.5, 0.5]])
    d, c = gt.dci_from_importance(R)
    assert d == pytest.approx(1.0 / 2.0 * 1 + 1.0 / 2.0 * 0, abs=1e-6)
    p = np.array([1.0, 0.5]) / 1.5  # factor 0 over codes 0 and 2, factor 1 on code 2 only
    c0 = 1 + (p * np.log(p)).sum() / math.log(3)
    assert c == pytest.approx(0.75 * c0 + 0.25 * 1.0, abs=1e-6)


@pytest.fixture(scope="module")
def dci_pair(metric_data):
    from sklearn.ensemble import GradientBoostingClassifier
    z, f, zt, ft = metric_data
    ours = gt.dci(z, f, zt, ft)
    R, train, test, raw = np.zeros((z.shape[1], f.shape[1])), [], [], []
    for k in range(f.shape[1]):
        # DL's call has every default; random_state (None there) only breaks ties: fixed here, for repeatability
        g = GradientBoostingClassifier(random_state=0).fit(z, f[:, k])
        R[:, k] = g.feature_importances_
        train.append(np.mean(g.predict(z) == f[:, k]))
        test.append(np.mean(g.predict(zt) == ft[:, k]))
        raw.append(g.decision_function(z))
    d, c = gt.dci_from_importance(R)
    ref = {"disentanglement": d, "completeness": c, "informativeness_train": np.mean(train),
           "informativeness_test": np.mean(test), "importance_matrix": R, "raw": raw}
    return ours, ref


@pytest.mark.parametrize("key", ["disentanglement", "completeness", "informativeness_train", "informativeness_test"])
def test_dci_matches_sklearn(dci_pair, key):
    ours, ref = dci_pair
    assert abs(ours[key] - ref[key]) < 0.01, (key, ours[key], ref[key])


def test_dci_importance_matches_sklearn(dci_pair):
    """Column sums of the duplicated pair (codes 5, 6) agree; each copy's share is sklearn's coin toss."""
    (ours, ref), keep = dci_pair, [0, 1, 2, 3, 4, 7, 8, 9]
    R, S = ours["importance_matrix"], ref["importance_matrix"]
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
    gt._compile_kernels()
    _, raw, _ = gt._gbt(x, gt.sorted_words(x), y.astype(np.int64), n_classes, x[:5], 0, 100, 0.1, 3)
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
    imp, _, _ = gt.gbt_classifier(z, y, z[:5], n_stages=3)
    _, raw, _ = gt._gbt(x, gt.sorted_words(x), y.astype(np.int64), n_classes, x[:5], 0, 3, 0.1, 3)
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
        imp, p, pt = gt.gbt_classifier(z, y, zt)
        ref, ref_p, ref_pt = sk[0].feature_importances_, sk[0].predict(z), sk[0].predict(zt)
        spread = max(np.abs(g.feature_importances_ - ref).max() for g in sk[1:])
        agree = min(min(np.mean(g.predict(z) == ref_p), np.mean(g.predict(zt) == ref_pt)) for g in sk[1:])
        assert np.abs(imp - ref).max() < max(spread, 0.002) + 0.005
        assert min(np.mean(p == ref_p), np.mean(pt == ref_pt)) > agree - 0.03


def test_dci_perfect_codes():
    rng = np.random.default_rng(3)
    f = rng.integers(0, 4, (1000, 3))
    z = f + 0.05 * rng.normal(size=f.shape)
    got = gt.dci(z[:700], f[:700], z[700:], f[700:])
    assert got["disentanglement"] > 0.9 and got["completeness"] > 0.9 and got["informativeness_test"] > 0.99


def test_dci_single_class_factor():
    rng = np.random.default_rng(4)
    f = np.c_[rng.integers(0, 3, 300), np.zeros(300, np.int64)]
    z = f + 0.1 * rng.normal(size=f.shape)
    got = gt.dci(z, f, z, f)
    assert np.all(got["importance_matrix"][:, 1] == 0) and got["informativeness_test"] > 0.9


# --- SAP -------------------------------------------------------------------------------------------------------

def test_linear_svc_coefficients_match_sklearn():
    """The exact optimum vs liblinear: at tol 1e-12 to 1e-5 (relative); at its default tol 1e-4 to 1e-3. Wrong
    class weights (e.g. C w_c on the negatives too) or an unregularised intercept move them by far more."""
    from sklearn.svm import LinearSVC
    rng = np.random.default_rng(5)
    warnings.simplefilter("ignore")  # liblinear's convergence warnings at tol 1e-12
    for _ in range(12):
        n, C = int(rng.integers(50, 300)), int(rng.integers(2, 6))
        y = rng.integers(0, C, n)
        y[:C] = np.arange(C)
        x = rng.normal(size=n) * rng.uniform(0.2, 3) + y * rng.uniform(-1, 1) + rng.uniform(-2, 2)
        ours = np.r_[gt.linear_svc_1d(x, y, C)]
        for kw, tol in [({"tol": 1e-12, "max_iter": 100_000}, 1e-5), ({}, 1e-3)]:
            s = LinearSVC(C=0.01, class_weight="balanced", **kw).fit(x[:, None], y)
            ref = np.r_[s.coef_.ravel(), s.intercept_]
            assert np.abs(ours - ref).max() <= tol * np.abs(ref).max(), (kw, ours, ref)


def test_sap_matches_sklearn(metric_data):
    z, f, zt, ft = metric_data
    from sklearn.svm import LinearSVC
    S = gt.sap_matrix(z, f, zt, ft)
    R = np.zeros_like(S)
    for i in range(z.shape[1]):
        for k in range(f.shape[1]):
            s = LinearSVC(C=0.01, class_weight="balanced").fit(z[:, i:i + 1], f[:, k])
            R[i, k] = np.mean(s.predict(zt[:, i:i + 1]) == ft[:, k])
    assert np.abs(S - R).max() < 0.01
    assert abs(gt.sap(z, f, zt, ft) - gt.sap_from_matrix(R)) < 0.01


def test_sap_anchors():
    rng = np.random.default_rng(6)
    f = rng.integers(0, 2, (2000, 3))
    z = f + 0.1 * rng.normal(size=f.shape)  # each binary factor in its own code
    assert gt.sap(z[:1000], f[:1000], z[1000:], f[1000:]) > 0.45  # ~1 for its code, ~0.5 for the others
    z2 = np.c_[z[:, 0], z[:, 0]]  # one factor, two identical codes: no gap
    assert gt.sap(z2[:1000], f[:1000, :1], z2[1000:], f[1000:, :1]) == 0.0


# --- modularity ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mi, want", [
    (np.diag(np.ones(5)), 1.0),
    (np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), 2.0 / 3.0),
    (np.hstack([np.eye(5), np.eye(5)]), 1 - 1 / 9),
])
def test_modularity_anchors(mi, want):
    assert gt.modularity_from_matrix(mi) == pytest.approx(want, abs=1e-12)


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
    np.testing.assert_allclose(gt.mutual_info_matrix(z, f), mi, atol=1e-12)
    assert gt.modularity(z, f) == pytest.approx(slow_modularity(mi), abs=1e-12)
    rand = rng.random((6, 4)) ** 3
    rand[2] = 0
    assert gt.modularity_from_matrix(rand) == pytest.approx(slow_modularity(rand), abs=1e-12)


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
        got = gt.factor_vae_accuracy(tk, td, ek, ed, K, D + 1)
        want = slow_majority_vote(list(zip(tk, td)), list(zip(ek, ed)))
        assert got == pytest.approx(want, abs=1e-15)


def test_factor_vae_votes_match_slow_version():
    rng = np.random.default_rng(9)
    batches = rng.normal(size=(50, 8, 6)) * rng.uniform(0.1, 2, 6)
    gvar = rng.uniform(0.5, 2, 6)
    active = np.array([True, False, True, True, False, True])
    got = gt.factor_vae_votes(batches, gvar, active)
    dims = np.flatnonzero(active)
    want = [int(np.argmin([np.var(b[:, d], ddof=1) / gvar[d] for d in dims])) for b in batches]
    assert got.tolist() == want


def test_factor_vae_anchors():
    """DL's test: 10 factors of 10 values, the identity representation, batches of 5, 3,000 / 2,000 votes,
    2,500 points for the variances -> in [0.9, 1]; constant codes -> in [0, 0.2] (prune 0: NaN ratios vote
    dim 0, as DL; prune 0.05: no active dim, 0)."""
    kw = dict(n_train=3000, n_eval=2000, n_var=2500, batch_size=5)
    ident = gt.factor_vae_score(lambda f: f.astype(float), [10] * 10, 0, prune=0.0, **kw)
    assert 0.9 <= ident["eval_accuracy"] <= 1.0 and 0.9 <= ident["train_accuracy"] <= 1.0
    calls = []
    zero = lambda f: (calls.append(len(f)), np.zeros((len(f), 10)))[1]  # noqa: E731
    for prune in (0.0, 0.05):
        got = gt.factor_vae_score(zero, [10] * 10, 1, prune=prune, **kw)
        assert 0.0 <= got["eval_accuracy"] <= 0.2
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
    got = gt.factor_vae_score(encode, sizes, 5, **kw)
    assert len(seen) == 200 + 60 and len(set(seen[200:])) == 60  # the variances' points, then each point once
    want_train, want_eval = slow_factor_vae(lambda f: np.tanh(f @ W), sizes, 5, **kw)
    assert (got["train_accuracy"], got["eval_accuracy"]) == pytest.approx((want_train, want_eval), abs=1e-15)
    assert 0.5 < got["eval_accuracy"] < 1


def test_every_run_scores_the_cheap_metrics_writes_its_codes_and_eval_only_adds_any(tmp_path, capsys):
    out = tmp_path / "run"
    assert gt.main(["--model", "gvae", *BASE, "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert {"mig", "group_mig", "modularity", "sap"} <= set(m) and "dci_disentanglement" not in m
    assert np.array(m["sap_matrix"]).shape == (10, 5) and m["sap"] == pytest.approx(gt.sap_from_matrix(m["sap_matrix"]))
    saved = np.load(out / "codes.npz")  # the evaluation points, for any outside tool
    assert saved["codes"].shape == (300, 10) and saved["factors"].shape == (300, 5)
    assert gt.mig(saved["codes"].astype(np.float64), saved["factors"]) == pytest.approx(m["mig"], abs=1e-6)
    assert gt.modularity(saved["codes"].astype(np.float64), saved["factors"]) == pytest.approx(m["modularity"],
                                                                                               abs=1e-6)
    assert gt.main(["--eval-only", "--out", str(out), "--metrics", "dci"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert 0 <= m["dci_disentanglement"] <= 1 and 0 <= m["dci_informativeness"] <= 1 and "sap" not in m
    with pytest.raises(SystemExit):  # argparse's error: usage, the message, exit status 2
        gt.main(["--eval-only", "--out", str(out), "--metrics", "sap,dcx"])
    assert "unknown metric dcx" in capsys.readouterr().err
    assert gt.main(["--summarize", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text()
    assert "DCI disentanglement mean" in table and "DCI completeness per factor" in table


# ------------------------------------------------------------------------------------------------ reproducibility
STUDY = json.loads((HERE / "fixtures" / "cpu_study_20_steps.json").read_text())
STUDY_XEON = json.loads((HERE / "fixtures" / "cpu_study_20_steps_intel_xeon.json").read_text())


AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}  # torch's and oneDNN's kernels: AVX2 at most


@pytest.mark.parametrize("name", ["group_tcvae_inter", "gvae"])  # the fixtures also hold TC full and MLVAE
def test_the_cpu_study_runs_are_computed_byte_for_byte(tmp_path, name):
    """docs/cpu_study's runs were trained by the code of commit 42d6587 and again, for the metric suite, by that of
    dbba711 (which passes this test), one thread a run, with AVX2 kernels: 20-step runs with their flags (the study's
    data, batch and models, seed 1) write the log.csv and MI matrix that 42d6587 wrote (fixtures/). On an AVX-512
    processor torch and oneDNN pick other kernels (the log differs from step 5) unless both are capped at AVX2. So
    capped, an AMD EPYC computes what the study's machine computed; an Intel Xeon (AVX-512) still does not, except for
    MLVAE: on it the runs must write what this code wrote there on 2026-12-03 (fixtures/, the Xeon's file)."""
    done = subprocess.run([sys.executable, "grouptc.py", *STUDY[name]["argv"], "--out", str(tmp_path / "run")],
                          cwd=HERE, env=os.environ | AVX2 | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [{k: v for k, v in r.items() if k != "ms_per_step"} for r in gt.read_log(tmp_path / "run" / "log.csv")]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["torch_threads"] == [1]
    assert metrics["machines"] == [f"torch {torch.__version__}, CPU AVX2 ({gt.cpu_vendor()}), oneDNN up to AVX2"]
    xeon = gt.cpu_vendor() == "GenuineIntel" and "avx512f" in Path("/proc/cpuinfo").read_text().split()
    expected = STUDY_XEON[name] if xeon else STUDY[name]
    assert rows == expected["log"]
    assert metrics["mi_matrix"] == expected["mi_matrix"]


def test_scores_over_training_are_logged_and_resumed_exactly(tmp_path, real_figures):
    argv = ["--model", "group_tcvae", "--dataset", "dsprites_procedural", "--steps", "8", "--batch-size", "4",
            "--log-every", "2", "--checkpoint-every", "100", "--eval-samples", "300", "--device", "cpu"]
    assert gt.main(argv + ["--out", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "scores.csv").exists()
    assert gt.main(argv + ["--eval-every", "3", "--out", str(tmp_path / "a")]) == 0
    assert run_main_interrupted_at(4, argv + ["--eval-every", "3", "--out", str(tmp_path / "b")]) == 130
    with open(tmp_path / "b" / "scores.csv", "a") as f:
        f.write("3")  # a row cut short by a crash, whose step still reads as one: dropped on resume
    assert gt.main(["--resume", "--out", str(tmp_path / "b")]) == 0
    a, b = (gt.read_log(tmp_path / r / "scores.csv") for r in "ab")
    assert [r["step"] for r in a] == ["3", "6"] and a == b
    final = json.loads((tmp_path / "a" / "metrics.json").read_text())
    # evaluating during training changes nothing in the training itself
    assert without_time(gt.read_log(tmp_path / "plain" / "log.csv")) == without_time(gt.read_log(tmp_path / "a" /
                                                                                                 "log.csv"))
    assert final["torch_threads"] == [torch.get_num_threads()]
    assert (tmp_path / "a" / "scores.png").stat().st_size > 5_000
    assert gt.main(["--summarize", str(tmp_path)]) == 0
    assert (tmp_path / "scores_dsprites_procedural.png").stat().st_size > 5_000


# ------------------------------------------------------------------------------------------------ as a library
def readme_python_block(title):
    text = (HERE / "README.md").read_text()
    section = text[text.index(f"## {title}\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_library_example_runs_as_written(tmp_path):
    done = subprocess.run([sys.executable, "-c", readme_python_block("Use it in your own code")], cwd=HERE,
                          capture_output=True, text=True, timeout=300, env=os.environ | {"PYTHONPATH": str(HERE)})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("{'loss': ") and "'d_acc': " in lines[0]
    assert lines[1].startswith("MIG ") and math.isfinite(float(lines[1].split()[1]))
    assert lines[2].startswith("group-MIG ") and math.isfinite(float(lines[2].split()[1]))


def test_library_functions_refuse_bad_arguments():
    vae, x, shares = gt.VAE(), torch.zeros(2, 2, 1, 64, 64), torch.tensor([True, False])
    with pytest.raises(ValueError, match="unknown model 'gvea'"):  # a typo no longer trains a plain VAE
        gt.group_objective("gvea", vae, None, x, shares, 1.0, 0.0, 5)
    with pytest.raises(ValueError, match="group_tcvae needs the discriminator"):
        gt.group_objective("group_tcvae", vae, None, x, shares, 1.0, 0.0, 5)
    with pytest.raises(ValueError, match=r"expected x \(B, G >= 2"):
        gt.group_objective("gvae", vae, None, x[:, :1], shares, 1.0, 0.0, 5)
    with pytest.raises(ValueError, match="content_dims must be in 1..9"):
        gt.group_objective("gvae", vae, None, x, shares, 1.0, 0.0, 10)
    with pytest.raises(ValueError, match="unknown TC level 'most'"):
        gt.tc_blocks("most", 10, 5)
    with pytest.raises(ValueError, match="give D and d_opt"):
        gt.train_step(vae, None, torch.optim.Adam(vae.parameters()), None, x, shares)
    codes, factors = np.random.rand(100, 4), np.random.randint(0, 3, (100, 2))
    with pytest.raises(ValueError, match="must each name some, not all"):
        gt.group_mig(codes, factors, content_latents=range(4), content_factors=[0])
    assert issubclass(gt.UserError, ValueError)


def test_the_metrics_leave_torchs_threads_alone_from_the_first_call_on():
    code = ("import numpy as np, torch, grouptc as gt; torch.set_num_threads(1); "
            "gt.mig(np.random.rand(500, 3), np.random.randint(0, 4, (500, 2))); a = torch.get_num_threads(); "
            "torch.set_num_threads(2); gt.mig(np.random.rand(500, 3), np.random.randint(0, 4, (500, 2))); "
            "print(a, torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["1", "2"], out.stdout + out.stderr


def test_checkpoints_of_earlier_versions_still_load(tmp_path):
    """Earlier checkpoints also hold the global RNG state (torch_rng), which nothing uses now; they lack
    torch_threads, machines, --pairs and --k (which read as their defaults)."""
    out = tmp_path / "run"
    assert gt.main(["--model", "gvae", *BASE, "--out", str(out)]) == 0
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    del checkpoint["torch_threads"], checkpoint["machines"], checkpoint["args"]["pairs"], checkpoint["args"]["k"]
    torch.save(checkpoint | {"torch_rng": torch.get_rng_state()}, out / "checkpoint.pt")
    assert gt.main(["--resume", "--out", str(out), "--steps", "9"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 9


def test_a_run_records_each_machine_it_trained_on_and_says_when_that_changes(tmp_path, capsys):
    """The sums depend on the torch build and the processor's kernels: a resume elsewhere says so, and metrics.json
    lists every machine in order."""
    out = tmp_path / "run"
    assert gt.main(["--model", "gvae", *BASE, "--out", str(out)]) == 0
    here = gt.machine(torch.device("cpu"))
    assert here.startswith(f"torch {torch.__version__}, CPU ")
    assert json.loads((out / "metrics.json").read_text())["machines"] == [here]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save(checkpoint | {"machines": ["torch 0.1, CPU AVX512"]}, out / "checkpoint.pt")
    capsys.readouterr()
    assert gt.main(["--resume", "--out", str(out), "--steps", "9"]) == 0
    assert f"trained with torch 0.1, CPU AVX512 and continues with {here}" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["machines"] == ["torch 0.1, CPU AVX512", here]


def test_the_summary_shows_a_model_and_a_score_it_does_not_know(tmp_path, capsys):
    out = tmp_path / "runs" / "good"
    assert gt.main(["--model", "gvae", *BASE, "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    (tmp_path / "runs" / "other").mkdir()
    (tmp_path / "runs" / "other" / "metrics.json").write_text(json.dumps(m | {"model": "new_model", "mig": 0.5} |
                                                                          {"new_score": 1.0}))
    del m["group_mig"]
    (tmp_path / "runs" / "partial").mkdir()
    (tmp_path / "runs" / "partial" / "metrics.json").write_text(json.dumps(m | {"seed": 1}))  # another seed's
    assert gt.main(["--summarize", str(tmp_path / "runs")]) == 0
    table = (tmp_path / "runs" / "results.md").read_text()
    assert "| new_model (batch 4) | 1 |" in table and "| gvae (batch 4) | 2 |" in table


# ------------------------------------------------------------------------------------------------ Ada models, pairs
def test_ada_shared_dims_follow_the_pairs_kl():
    """disentanglement_lib's rule on posteriors fixed by hand: delta_j = KL(q1_j || q2_j); dims strictly below the
    midpoint of the pair's min and max delta are shared (the largest never, the smallest always)."""
    mu = torch.zeros(3, 2, 4)
    logvar = torch.zeros(3, 2, 4)
    mu[0, 1, 2] = 3.0  # pair 0: one large delta (dim 2), the others 0
    mu[1, 1] = torch.tensor([0.0, 1.0, 2.0, 3.0])  # pair 1: delta 0, 0.5, 2, 4.5 -> midpoint 2.25
    # pair 2: identical images, every delta 0
    shared = gt.adaptive_shared_dims(mu, logvar)
    assert shared[0].tolist() == [True, True, False, True]
    assert shared[1].tolist() == [True, True, True, False]
    assert shared[2].tolist() == [False] * 4  # all-equal delta: none shared (disentanglement_lib: 0 / 0)
    # one-sided: KL(q1 || q2), the first image as "from"
    lv = torch.zeros(1, 2, 2)
    lv[0, 1, 0] = math.log(4.0)  # dim 0: var1 = 1, var2 = 4
    mu2 = torch.zeros(1, 2, 2)
    mu2[0, 1, 1] = 1.2  # dim 1: a shift of 1.2
    d0 = 0.5 * (math.log(4.0) + 1 / 4 - 1)  # KL(N(0, 1) || N(0, 4)) = 0.193; the reverse is 0.307
    assert d0 < 0.5 * 1.2 ** 2  # dim 0 has the smaller one-sided delta: shared only if that direction is taken
    assert gt.adaptive_shared_dims(mu2, lv)[0].tolist() == [True, False]


@pytest.mark.parametrize("model", ["ada_gvae", "ada_mlvae"])
def test_ada_models_aggregate_the_shared_dims_of_both_images(model):
    """The regression tests for disent's two bugs: an image averaged with itself, and an inverted mask."""
    class Fixed(torch.nn.Module):  # an "encoder" with posteriors fixed by hand, and a decoder of zeros
        def encode(self, x):
            mu = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.2, 5.0]])  # image 1, image 2 of one pair
            logvar = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]])
            return mu, logvar

        def decode(self, z):
            return torch.zeros(len(z), 1, 4, 4) + z.sum() * 0

    x = torch.zeros(1, 2, 1, 4, 4)
    seen = {}
    original = gt.kl_to_prior
    gt.kl_to_prior = lambda mu, logvar: seen.update(mu=mu, logvar=logvar) or original(mu, logvar)
    try:
        loss, terms, z = gt.group_objective(model, Fixed(), None, x, None, beta=2.0, gamma=0.0, content_dims=1,
                                            eps=torch.zeros(1, 2, 3))
    finally:
        gt.kl_to_prior = original
    mu, logvar = seen["mu"][0], seen["logvar"][0]  # (2, 3): the partly aggregated posteriors
    # deltas: dim 0 = 0.5 (log 2 + 1/2 + 1/2 - 1) = 0.347, dim 1 = 0.02, dim 2 = 12.5: midpoint 6.26 -> dims 0, 1
    assert terms["shared_dims"].item() == 2
    v1, v2 = 1.0, 2.0
    if model == "ada_gvae":  # mean of the means, log of the mean variance
        m0, lv0 = 0.5, math.log((v1 + v2) / 2)
    else:  # the true product of the two Gaussians
        m0, lv0 = (0.0 / v1 + 1.0 / v2) / (1 / v1 + 1 / v2), math.log(1 / (1 / v1 + 1 / v2))
    assert mu[:, 0].tolist() == pytest.approx([m0, m0]) and logvar[:, 0].tolist() == pytest.approx([lv0, lv0])
    assert mu[:, 1].tolist() == pytest.approx([0.1, 0.1])  # both images get the aggregate, not one its own
    assert mu[:, 2].tolist() == [0.0, 5.0]  # the dim that differs most keeps each image's own posterior
    kl = original(seen["mu"], seen["logvar"]).sum(-1).mean()
    assert torch.allclose(loss, terms["rec"] + 2.0 * kl) and torch.allclose(terms["kl"], kl)


def exact_identical_fraction(sizes):
    """P(a pair of disentanglement_lib's k = rnd pairs is identical): every resampled factor drew its old value."""
    K = len(sizes)
    p_subset = lambda n: np.mean([np.prod([1 / sizes[j] for j in c])  # noqa: E731
                                  for c in itertools.combinations(range(K), n)])
    return 0.5 * p_subset(1) + 0.5 * np.mean([p_subset(k) for k in range(1, K)])


def test_k_factor_pairs_have_the_exact_statistics():
    sizes = gt.DSPRITES_SIZES
    g = torch.Generator().manual_seed(0)
    classes, resampled = gt.sample_k_factor_pairs(sizes, 200_000, None, False, g)
    n = resampled.sum(1)
    assert abs((n == 1).float().mean().item() - 0.625) < 0.005  # 1/2 + 1/2 * P(k = 1) = 1/2 + 1/8
    identical = (classes[:, 0] == classes[:, 1]).all(1).float().mean().item()
    assert abs(identical - exact_identical_fraction(sizes)) < 0.003 and 0.07 < identical < 0.08
    assert ((classes[:, 0] != classes[:, 1]) <= resampled).all()  # only resampled factors change
    for k in (1, 3):
        classes, resampled = gt.sample_k_factor_pairs(sizes, 50_000, k, False, g)
        assert set(resampled.sum(1).unique().tolist()) == {1, k}
        classes, resampled = gt.sample_k_factor_pairs(sizes, 50_000, k, True, g)
        changed = classes[:, 0] != classes[:, 1]
        assert (changed.sum(1) == k).all() and torch.equal(changed, resampled)  # exactly k, each to a new value
        assert changed.float().mean(0).sub(k / 5).abs().max() < 0.01  # the factors chosen uniformly
    assert ((classes >= 0) & (classes < torch.tensor(sizes))).all()
    with pytest.raises(ValueError, match="k must be in 1..4"):
        gt.sample_k_factor_pairs(sizes, 4, 5)


@pytest.mark.parametrize("model,pairs", [("ada_gvae", "groups"), ("ada_gvae", "k_factors"),
                                         ("ada_mlvae", "k_factors_exact")])
def test_ada_models_train_on_every_kind_of_pairs(tmp_path, model, pairs):
    out = tmp_path / "run"
    assert gt.main(["--model", model, "--pairs", pairs, "--k", "2", *BASE, "--out", str(out)]) == 0
    rows = gt.read_log(out / "log.csv")
    assert list(rows[0]) == ["step", "loss", "rec", "kl", "shared_dims", "ms_per_step"]
    assert 0 < float(rows[-1]["shared_dims"]) < 10
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["model"], metrics["pairs"], metrics["k"]) == (model, pairs, 2)
    # its flags come back from its checkpoint; typed anew, its own --pairs agrees (whatever --model defaults to)
    assert gt.main(["--resume", "--out", str(out), "--steps", "8", "--pairs", pairs]) == 0


def test_pairs_are_checked_against_the_model(tmp_path, capsys):
    for flags, message in ((["--model", "gvae", "--pairs", "k_factors"], "gvae must be told which group"),
                           (["--model", "ada_gvae", "--group-size", "3"], "ada_gvae learns from pairs"),
                           (["--model", "ada_mlvae", "--k", "5"], "--k must be rnd or 1 .. 4")):
        assert gt.main([*BASE, *flags, "--out", str(tmp_path / "r")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
