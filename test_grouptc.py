"""Tests for grouptc.py: oracles for every pure function, tiny files in the official layouts, smoke runs of the
CLI. Run: python -m pytest -q test_grouptc.py"""

import argparse
import errno
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
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


def correlated_codes(n, pair, generator, rho=0.95):
    """(n, 10) Gaussian codes, z_\\c = dims 0-4 and z_c = dims 5-9, every dim independent but for one pair of dims
    (i, j): corr(z_i, z_j) = rho. Their total TC is -log(1 - rho^2) / 2 = 1.164 nats; their inter-group TC is that
    if the pair crosses the groups, else 0."""
    i, j = pair
    z = torch.randn(n, 10, generator=generator)
    z[:, j] = rho * z[:, i] + math.sqrt(1 - rho ** 2) * z[:, j]
    return z


@pytest.mark.parametrize("level, pair, split", [("inter", (0, 5), True), ("inter", (0, 1), False),
                                                 ("full", (0, 1), True)])  # the paper's level and FactorVAE's
def test_the_tc_estimate_measures_dependence(level, pair, split):
    """The discriminator, trained as the training loop trains it (the same 6 x 1000 network, Adam 1e-4 with betas
    0.5/0.9, 64 codes a step, the level's permutation), on codes whose TC is known in closed form: its estimate on
    each step's fresh codes, averaged over steps 51-100, is about 0 where the level's permutation keeps the dependent
    pair together (inter: a pair within one group) and within 20% of a large TC (1.164 nats) where it splits it."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    D = gt.Discriminator(10)
    opt = torch.optim.Adam(D.parameters(), lr=1e-4, betas=(0.5, 0.9))
    blocks, estimates = gt.tc_blocks(level, 10, 5), []
    for _ in range(100):
        z = correlated_codes(64, pair, g)
        with torch.no_grad():
            estimates.append(gt.tc_estimate(D(z)).item())  # before D has seen these codes
        loss, _ = gt.discriminator_loss(D, z, gt.permute_codes(z, blocks, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    true_tc = -0.5 * math.log(1 - 0.95 ** 2) if split else 0.0  # 1.164 nats where the permutation splits the pair
    assert abs(np.mean(estimates[50:]) - true_tc) < 0.02 + 0.2 * true_tc, np.mean(estimates[50:])


def tiny_run(tmp_path, *extra, model="group_tcvae"):
    args = gt.parse_args(["--model", model, "--dataset", "dsprites_procedural", "--batch-size", "4",
                          "--out", str(tmp_path / "run"), *extra])
    return gt.build_run(args)


def tiny_batch(run):
    classes, shares = run.sample()
    return run.images(classes), shares


def test_discriminator_update_leaves_the_encoder_gradients_untouched(tmp_path):
    run = tiny_run(tmp_path)
    for _ in range(3):  # several full steps: no in-place autograd error (a known failure of FactorVAE ports)
        gt.train_step(run.vae, run.D, run.vae_opt, run.d_opt, *tiny_batch(run), **run.hyper)
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
    with pytest.raises(ValueError, match="codes contain 1 NaN or infinite values"):
        gt.mutual_info_matrix(np.array([[np.inf, 0.0], [1.0, 2.0]]), np.array([[0], [1]]))
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
TINY = ["--steps", "6", "--batch-size", "4", "--log-every", "3", "--checkpoint-every", "3", "--eval-samples", "300"]
FIGURES = ("mi_matrix.png", "reconstructions.png", "traversals.png", "training_curves.png")


@pytest.mark.parametrize("model,dataset,extra,real", [  # real: the figures as drawn (one grey, one colour data set)
    ("group_tcvae", "dsprites_procedural", [], True),
    ("group_tcvae", "dsprites_procedural", ["--tc-level", "inter_intra", "--group-size", "3"], False),
    ("group_tcvae", "shapes3d_procedural", ["--tc-level", "full"], True),
    ("mlvae", "dsprites_procedural", ["--group-size", "5"], False),
    ("gvae", "shapes3d_procedural", ["--content-factors", "floor_hue,wall_hue"], False),
])
def test_every_model_trains_and_writes_every_output(tmp_path, request, model, dataset, extra, real):
    out = tmp_path / "run"
    if real:
        request.getfixturevalue("real_figures")
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
        assert (out / name).stat().st_size > (5_000 if real else 0), name


def run_main_interrupted_at(step, argv):
    """Run main() and press Ctrl-C (a real SIGINT) right after training step `step` -> main()'s exit status."""
    original, calls = gt.train_step, [0]

    def step_then_interrupt(*args, **kwargs):
        terms = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == step:
            os.kill(os.getpid(), signal.SIGINT)
        return terms

    gt.train_step = step_then_interrupt
    try:
        return gt.main(argv)
    finally:
        gt.train_step = original


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
    (["--seed", str(2 ** 31)], "--seed must be a whole number from 0 to 2,147,483,647"),  # 2^32 would be seed 0
    (["--eval-samples", "2000000000"], "--eval-samples must be 0 (all points) or 100 .. 737,280"),
    (["--beta", "1e39"], "a float32 holds"),
    (["--seed", "0,1"], "a run has one seed, got '0,1'; for several runs, one process each, use run_paper.sh"),
    (["--gamma", "1,8"], "a run has one gamma"),
    (["--summarize", "runs"], "--summarize is compare.py's now: python compare.py summarize"),
    (["--metrics", "all"], "--metrics is compare.py's now"),
    (["--compile"], "unrecognized arguments: --compile"),
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
        if "_procedural" in c and not args.eval_only and not args.resume:
            out = tmp_path / f"run{ran}"
            assert gt.main(argv + ["--out", str(out)] + TINY) == 0, c
            ran += 1
    assert ran >= 1


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
_TEMPLATE = []


def gvae_run(out):
    """A finished TINY GVAE run in `out`: trained once, then copied, for the tests that need a run, not a training."""
    if not _TEMPLATE:
        _TEMPLATE.append(Path(tempfile.mkdtemp()) / "run")
        assert gt.main(["--model", "gvae", *BASE, "--out", str(_TEMPLATE[0])]) == 0
    shutil.copytree(_TEMPLATE[0], out)


def test_results_without_their_checkpoint_are_never_trained_over(tmp_path, capsys):
    out = tmp_path / "runs" / "run"  # an archive's run: its small files, its checkpoint left out
    gvae_run(out)
    (out / "checkpoint.pt").unlink()
    kept = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file() and f.name != ".lock"}
    for argv, code, said in ((["--resume", "--out", str(out)], 0, "nothing is left to do"),
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
    gvae_run(out)
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
    config = vars(gt.parse_args(["--model", "gvae", "--beta", "4", "--out", str(out), *BASE]))
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
    gvae_run(out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert gt.main(["--resume", "--out", str(out), "--steps", "3"]) == 2
    assert "--steps 3 is below the 6 steps" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert gt.main(["--resume", "--out", str(out)]) == 0  # finished: nothing to do, nothing rewritten
    assert "nothing to do" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_eval_only_never_replaces_good_metrics_with_nan(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    gvae_run(out)
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
    gvae_run(out)
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
    gvae_run(out)
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
    assert metrics["factor_sizes"] == [3, 2, 2, 3, 2]  # a sub-grid run says so (compare.py labels it so)
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
    gvae_run(out)
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
    gvae_run(out)
    good = (out / "metrics.json").read_bytes()

    def interrupted(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(gt, "mutual_info_and_entropy", interrupted)
    assert gt.main(["--eval-only", "--out", str(out)]) == 130
    assert "interrupted; the files in" in capsys.readouterr().err
    assert (out / "metrics.json").read_bytes() == good


def test_retyping_the_default_content_factors_on_resume_is_accepted(tmp_path, capsys):
    out = tmp_path / "run"
    gvae_run(out)
    assert gt.main(["--resume", "--out", str(out), "--steps", "8", "--content-factors",
                    "orientation, shape,scale"]) == 0
    assert gt.main(["--resume", "--out", str(out), "--steps", "9", "--content-factors", "posX"]) == 2
    assert "--content-factors posX differs" in capsys.readouterr().err


def test_help_shows_every_meaningful_default(capsys):
    with pytest.raises(SystemExit):
        gt.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "permutations) (default: 0)" in text and "--log-every" in text  # --seed's default, and no "(default: None)"
    assert "(default: None)" not in text


def test_readme_says_how_to_avoid_the_cuda_download_before_the_setup_commands():
    text = (HERE / "README.md").read_text()
    assert text.index("download.pytorch.org/whl/cpu") < text.index("pip install -r requirements.txt")


def test_evaluation_on_every_point_shows_progress(tmp_path, monkeypatch, capsys):
    run = tiny_run(tmp_path, model="gvae")
    monkeypatch.setattr(type(run.data), "factor_sizes", (3, 2, 2, 4, 3))
    gt.evaluate(run.vae, run.data, run.content_factors, 5, 0)
    assert "encoding 144 points: 100.0%" in capsys.readouterr().err


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


def without_time(rows):
    return [{k: float(v) for k, v in r.items() if k != "ms_per_step"} for r in rows]


# ------------------------------------------------------------------------------------- one run, one folder (#19)
def test_a_run_name_is_every_run_defining_flag_exactly():
    base = gt.parse_args(["--model", "gvae", "--dataset", "dsprites_procedural", "--device", "cpu"])
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
    assert gt.parse_args(["--model", "gvae", "--beta", "4"]).out == "runs/gvae_dsprites_beta4_gamma0_gs2_tc-inter_seed0"


def test_finished_means_trained_to_its_steps_and_evaluated_there(tmp_path):
    runs = tmp_path / "runs"
    name = "gvae_dsprites_procedural_beta1_gamma0_gs2_tc-inter_bs4_seed0"
    out = runs / "dsprites_procedural" / name
    argv = ["--model", "gvae", "--dataset", "dsprites_procedural", "--steps", "4", "--batch-size", "4",
            "--log-every", "2", "--checkpoint-every", "2", "--eval-samples", "200", "--device", "cpu",
            "--out", str(out)]
    assert run_main_interrupted_at(2, argv) == 130
    assert gt.main(["--eval-only", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert gt.main(["--resume", "--out", str(out)]) == 0  # evaluated at step 2 of 4: not finished, so it trains on
    assert [r["step"] for r in gt.read_log(out / "log.csv")] == ["2", "4"]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    before = (out / "metrics.json").read_bytes()
    assert gt.main(["--resume", "--out", str(out)]) == 0 and (out / "metrics.json").read_bytes() == before


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
    gvae_run(out)
    good = (out / "metrics.json").read_bytes()
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    for t in checkpoint["vae"].values():
        t.fill_(float("nan"))
    torch.save(checkpoint, out / "checkpoint.pt")
    assert gt.main(["--eval-only", "--out", str(out)]) == 2
    assert "NaN or infinite codes" in capsys.readouterr().err
    assert (out / "metrics.json").read_bytes() == good


def test_what_a_person_sees(tmp_path, capsys, real_figures):
    out = tmp_path / "run"
    assert gt.main(["--model", "gvae", "--dataset", "dsprites_procedural", "--device", "cpu", "--steps", "30",
                    "--batch-size", "4", "--eval-samples", "300", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "(first step: includes start-up)" in err  # a progress line before the first --log-every
    metrics = json.loads((out / "metrics.json").read_text())
    assert gt.figure_title(metrics) == "gvae on dsprites_procedural: beta 1, gamma 0, seed 0, 30 steps"
    for name in FIGURES:  # written before metrics.json, the mark of a finished run
        assert (out / name).stat().st_mtime <= (out / "metrics.json").stat().st_mtime
    assert len(gt.read_log(out / "log.csv")) == 10  # --log-every: a tenth of --steps, so the curves have 10 points


def test_every_run_scores_mig_and_group_mig_and_writes_its_codes(tmp_path, capsys):
    out = tmp_path / "run"
    gvae_run(out)
    m = json.loads((out / "metrics.json").read_text())
    assert {"mig", "group_mig", "mi_matrix", "factor_entropy"} <= set(m) and "sap" not in m
    saved = np.load(out / "codes.npz")  # the evaluation points, for any outside tool (compare.py score)
    assert saved["codes"].shape == (300, 10) and saved["factors"].shape == (300, 5)
    assert gt.mig(saved["codes"].astype(np.float64), saved["factors"]) == pytest.approx(m["mig"], abs=1e-6)
    assert gt.group_mig(saved["codes"].astype(np.float64), saved["factors"], range(5, 10), (0, 1, 2)) == \
        pytest.approx(m["group_mig"], abs=1e-6)


def test_scores_over_training_are_logged_and_resumed_exactly(tmp_path, request):
    argv = ["--model", "group_tcvae", "--dataset", "dsprites_procedural", "--steps", "8", "--batch-size", "4",
            "--log-every", "2", "--checkpoint-every", "100", "--eval-samples", "300", "--device", "cpu"]
    assert gt.main(argv + ["--out", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "scores.csv").exists()
    assert run_main_interrupted_at(4, argv + ["--eval-every", "3", "--out", str(tmp_path / "b")]) == 130
    with open(tmp_path / "b" / "scores.csv", "a") as f:
        f.write("3")  # a row cut short by a crash, whose step still reads as one: dropped on resume
    assert gt.main(["--resume", "--out", str(tmp_path / "b")]) == 0
    request.getfixturevalue("real_figures")  # from here on: run a's scores.png as drawn
    assert gt.main(argv + ["--eval-every", "3", "--out", str(tmp_path / "a")]) == 0
    a, b = (gt.read_log(tmp_path / r / "scores.csv") for r in "ab")
    assert [r["step"] for r in a] == ["3", "6"] and a == b
    final = json.loads((tmp_path / "a" / "metrics.json").read_text())
    # evaluating during training changes nothing in the training itself
    assert without_time(gt.read_log(tmp_path / "plain" / "log.csv")) == without_time(gt.read_log(tmp_path / "a" /
                                                                                                 "log.csv"))
    assert final["torch_threads"] == [torch.get_num_threads()]
    assert (tmp_path / "a" / "scores.png").stat().st_size > 5_000


# ------------------------------------------------------------------------------------------------ as a library
def readme_python_block(title):
    text = (HERE / "README.md").read_text()
    section = text[text.index(f"## {title}\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_library_example_runs_as_written(tmp_path):
    """From a folder outside the clone, with the clone on PYTHONPATH as the README says, and beside a folder named
    grouptc (the clone's own name, seen from the folder above it), which must not shadow the module."""
    (tmp_path / "grouptc").mkdir()
    done = subprocess.run([sys.executable, "-c", readme_python_block("Use it in your own code")], cwd=tmp_path,
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


def test_a_run_records_each_machine_it_trained_on_and_says_when_that_changes(tmp_path, capsys):
    """The sums depend on the torch build and the processor's kernels: a resume elsewhere says so, and metrics.json
    lists every machine in order."""
    out = tmp_path / "run"
    gvae_run(out)
    here = gt.machine(torch.device("cpu"))
    assert here.startswith(f"torch {torch.__version__}, CPU ")
    assert json.loads((out / "metrics.json").read_text())["machines"] == [here]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save(checkpoint | {"machines": ["torch 0.1, CPU AVX512"]}, out / "checkpoint.pt")
    capsys.readouterr()
    assert gt.main(["--resume", "--out", str(out), "--steps", "9"]) == 0
    assert f"trained with torch 0.1, CPU AVX512 and continues with {here}" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["machines"] == ["torch 0.1, CPU AVX512", here]


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
                                            generator=torch.Generator().manual_seed(0))
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


# ------------------------------------------------------------------- trying to break it, round 2 (issue 44)
def test_d1_seeds_a_generator_cannot_tell_apart_are_refused(capsys):
    assert torch.Generator().manual_seed(2 ** 32).initial_seed() != 0 or True  # torch keeps the seed...
    a = torch.rand(3, generator=torch.Generator().manual_seed(2 ** 32))
    assert torch.equal(a, torch.rand(3, generator=torch.Generator().manual_seed(0)))  # ...but draws as seed 0
    assert gt.main(["--model", "gvae", *BASE, "--seed", str(2 ** 32)]) == 2
    assert "--seed must be a whole number from 0 to 2,147,483,647" in capsys.readouterr().err
    assert gt.check_args(gt.parse_args(["--seed", str(gt.MAX_SEED)]))  # the largest: its model seed still < 2^32
    assert gt.MAX_SEED + 1_000_003 < 2 ** 32


@pytest.mark.parametrize("flags", [["--batch-size", "3000000"], ["--latent-dim", "1000000000"]])
def test_d2_a_run_that_cannot_fit_is_refused_before_anything_is_built(tmp_path, capsys, monkeypatch, flags):
    built = []
    monkeypatch.setattr(gt, "load_dataset", lambda *a, **k: built.append(a))
    assert gt.main(["--model", "group_tcvae", *BASE, *flags, "--out", str(tmp_path / "run")]) == 2
    assert "this run needs about" in capsys.readouterr().err
    assert built == [] and not (tmp_path / "run").exists()


def test_d6_a_single_point_factor_grid_is_refused_before_training(tmp_path, capsys):
    write_dsprites_npz(tmp_path / gt.DSPRITES_NPZ, np.zeros((1, 64, 64), np.uint8), np.zeros((1, 6), np.int64))
    argv = ["--model", "gvae", "--dataset", "dsprites", "--data-dir", str(tmp_path), "--allow-subgrid",
            "--eval-samples", "0", *TINY[:-2], "--out", str(tmp_path / "run")]
    assert gt.main(argv) == 2
    assert "factor grid is a single point" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_d7_the_lock_never_follows_a_symlink(tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(victim)
    assert gt.main(["--model", "gvae", *BASE, "--out", str(tmp_path / "run")]) == 2
    assert ".lock is a symbolic link" in capsys.readouterr().err
    assert victim.read_text() == "mine"


def test_d8_a_folder_without_a_saved_run_is_never_resumed_into_the_defaults(tmp_path, capsys, monkeypatch):
    (tmp_path / "run").mkdir()  # what a kill before config.json leaves: a folder and its lock
    (tmp_path / "run" / ".lock").write_text("process 1 on host\n")
    assert gt.main(["--resume", "--out", str(tmp_path / "run")]) == 2
    assert "holds no saved run" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]

    def interrupted(*a, **k):  # Ctrl-C while the data loads, before anything is written
        raise KeyboardInterrupt
    monkeypatch.setattr(gt, "load_dataset", interrupted)
    assert gt.main(["--model", "gvae", *BASE, "--out", str(tmp_path / "new")]) == 130
    err = capsys.readouterr().err
    assert "nothing to continue" in err and "--resume" not in err


def test_d9_a_resume_keeps_the_runs_evaluation_points(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main_interrupted_at(3, ["--model", "gvae", *BASE, "--eval-every", "3", "--out", str(out)]) == 130
    assert gt.main(["--resume", "--out", str(out), "--eval-samples", "400"]) == 2
    assert "--eval-samples 400 differs from the run" in capsys.readouterr().err
    assert gt.main(["--resume", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["eval_samples"] == 300
    assert gt.main(["--eval-only", "--out", str(out), "--eval-samples", "400"]) == 0  # re-scoring may use others


def test_d10_a_damaged_checkpoint_is_refused_and_nothing_is_rewritten(tmp_path, capsys):
    out = tmp_path / "run"
    gvae_run(out)
    good = (out / "metrics.json").read_bytes()
    import zipfile
    with zipfile.ZipFile(out / "checkpoint.pt") as z:
        info = max(z.infolist(), key=lambda i: i.file_size)  # the largest weight record
    data = bytearray((out / "checkpoint.pt").read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 64
    data[start:start + 4] = bytes(255 - b for b in data[start:start + 4])
    (out / "checkpoint.pt").write_bytes(bytes(data))
    for flags in (["--eval-only"], ["--resume", "--steps", "9"]):
        assert gt.main([*flags, "--out", str(out)]) == 2
        assert "is damaged" in capsys.readouterr().err
    assert (out / "metrics.json").read_bytes() == good


@pytest.mark.parametrize("field,value,message", [
    ("step", -5, "wrong: step"), ("step", True, "wrong: step"), ("log_count", "abc", "wrong: log_count"),
    ("log_sum", torch.zeros(7), "running sums have shape (7,)"), ("train_seconds", None, "wrong: train_seconds"),
    ("torch_threads", None, "checkpoint format before 2"), ("torch_threads", ["abc"], "wrong: torch_threads"),
    ("log_sum", torch.zeros(3, dtype=torch.long), "wrong: log_sum"), ("version", 1, "checkpoint format 1"),
    ("data_gen", "damaged", "damaged generator state")])
def test_d11_every_checkpoint_field_is_checked(tmp_path, capsys, field, value, message):
    out = tmp_path / "run"
    gvae_run(out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "checkpoint.pt"}
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    if field == "torch_threads" and value is None:
        del checkpoint[field], checkpoint["version"]  # an earlier version's checkpoint
    elif value == "damaged":  # a CPU generator's state of the right size, but not one
        checkpoint[field] = torch.full_like(checkpoint[field], 255)
    else:
        checkpoint[field] = value
    torch.save(checkpoint, out / "checkpoint.pt")
    assert gt.main(["--resume", "--out", str(out), "--steps", "9"]) == 2
    assert message in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "checkpoint.pt"} == before


def test_d12_a_stop_during_evaluation_stops_it_cleanly(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    gvae_run(out)
    good, handler = (out / "metrics.json").read_bytes(), signal.getsignal(signal.SIGINT)
    original = gt.mutual_info_and_entropy

    def signalled(*a, **k):  # SIGINT arrives while the MI is computed
        os.kill(os.getpid(), signal.SIGINT)
        return original(*a, **k)
    monkeypatch.setattr(gt, "mutual_info_and_entropy", signalled)
    assert gt.main(["--eval-only", "--out", str(out)]) == 130
    assert "Continue with: python grouptc.py --eval-only" in capsys.readouterr().err
    assert (out / "metrics.json").read_bytes() == good
    assert signal.getsignal(signal.SIGINT) is handler  # put back


@pytest.mark.parametrize("name", ["config.json", "metrics.json", "log.csv"])
def test_d13_a_fifo_in_a_run_folder_is_refused_not_waited_on(tmp_path, capsys, name):
    out = tmp_path / "run"
    gvae_run(out)
    (out / name).unlink()
    os.mkfifo(out / name)
    assert gt.main(["--resume", "--out", str(out), "--steps", "9"]) == 2  # returns: nothing opened the pipe
    assert f"{out / name} is not a regular file" in capsys.readouterr().err


def test_d14_a_path_that_is_not_text_is_refused_up_front(tmp_path, capsys):
    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/run\xff")
    assert gt.main(["--model", "gvae", *BASE, "--out", out]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_the_discriminator_says_which_codes_it_takes():
    D = gt.Discriminator(latent_dim=10)
    assert D(torch.zeros(4, 10)).shape == (4, 2)
    with pytest.raises(ValueError, match=r"takes codes \(N, 10\), got \(4, 6\)"):
        D(torch.zeros(4, 6))
    assert set(gt.__all__) <= set(dir(gt))  # the public API names what is there


def test_a_stop_during_an_evaluation_over_training_loses_no_training(tmp_path, monkeypatch, capsys):
    """SIGINT while the scores at step 4 are computed: the step's checkpoint is there, and the resumed run's log.csv
    and scores.csv are an uninterrupted run's (the interrupted evaluation is done again first)."""
    argv = ["--model", "gvae", *BASE, "--steps", "8", "--log-every", "2", "--checkpoint-every", "100",
            "--eval-every", "4"]
    assert gt.main([*argv, "--out", str(tmp_path / "a")]) == 0
    original, calls = gt.mutual_info_and_entropy, [0]

    def signalled(*a, **k):
        calls[0] += 1
        if calls[0] == 1:  # the evaluation at step 4
            os.kill(os.getpid(), signal.SIGINT)
        return original(*a, **k)
    monkeypatch.setattr(gt, "mutual_info_and_entropy", signalled)
    assert gt.main([*argv, "--out", str(tmp_path / "b")]) == 130
    assert "Continue with: python grouptc.py --resume" in capsys.readouterr().err
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 4
    monkeypatch.undo()
    assert gt.main(["--resume", "--out", str(tmp_path / "b")]) == 0
    for name in ("log.csv", "scores.csv"):
        a, b = (gt.read_log(tmp_path / r / name) for r in "ab")
        assert without_time(a) == without_time(b), name
