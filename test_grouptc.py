"""Tests for grouptc.py: oracles for every pure function, tiny files in the official layouts, smoke runs of the
CLI. Run: python -m pytest -q test_grouptc.py"""

import csv
import hashlib
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

import grouptc as gt

HERE = Path(__file__).resolve().parent
REAL_FRAMES = HERE.parent / "shared" / "data" / "dsprites_real_frames.npz"


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


def tiny_dsprites_arrays(seed=0):
    rng = np.random.default_rng(seed)
    n = int(np.prod(TINY_DSPRITES))
    classes = np.stack(np.unravel_index(np.arange(n), TINY_DSPRITES), 1).astype(np.int64)
    imgs = rng.integers(0, 2, (n, 64, 64), dtype=np.uint8)
    return imgs, classes


def write_dsprites_npz(path, imgs, classes):
    metadata = {"latents_sizes": np.array(TINY_DSPRITES), "latents_names": ("color", "shape", "scale",
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
    data = gt.load_dataset("dsprites", tmp_path)
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
    data = gt.load_dataset("shapes3d", tmp_path)
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
    data = gt.load_dataset("dsprites", tmp_path / "good")
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
        gt.load_dataset("dsprites", tmp_path)
    np.savez(path, imgs=imgs.astype(np.float32), latents_classes=classes)  # wrong dtype
    with pytest.raises(gt.UserError, match="uint8"):
        gt.load_dataset("dsprites", tmp_path)
    np.savez(path, imgs=imgs, latents_classes=classes[::-1].copy())  # rows out of order
    with pytest.raises(gt.UserError, match="not ordered"):
        gt.load_dataset("dsprites", tmp_path)
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


def test_discriminator_sees_dependence_between_the_groups():
    """With z_c dependent on z_\\c (0.83 nats for rho = 0.9 per pair of dims... here one pair), a fresh D learns to
    tell q from q-bar and the TC estimate is positive; on independent codes it stays near 0."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    blocks = gt.tc_blocks("inter", 2, 1)
    results = {}
    for rho in (0.9, 0.0):
        D = gt.Discriminator(2, hidden=64, layers=3)
        opt = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.9))
        for _ in range(400):
            a = torch.randn(256, 1, generator=g)
            z = torch.cat([a, rho * a + math.sqrt(1 - rho ** 2) * torch.randn(256, 1, generator=g)], 1)
            loss, acc = gt.discriminator_loss(D, z, gt.permute_codes(z, blocks, g))
            opt.zero_grad()
            loss.backward()
            opt.step()
        a = torch.randn(4096, 1, generator=g)
        z = torch.cat([a, rho * a + math.sqrt(1 - rho ** 2) * torch.randn(4096, 1, generator=g)], 1)
        with torch.no_grad():
            results[rho] = gt.tc_estimate(D(z)).item(), gt.discriminator_loss(D, z, gt.permute_codes(z, blocks, g))[1]
    true_tc = -0.5 * math.log(1 - 0.9 ** 2)  # 0.83 nats
    assert 0.4 * true_tc < results[0.9][0] < 1.5 * true_tc and results[0.9][1] > 0.65
    assert abs(results[0.0][0]) < 0.1 and results[0.0][1] < 0.56


def tiny_run(tmp_path, *extra, model="group_tcvae"):
    args = gt.finish_args(gt.parse_args(["--model", model, "--dataset", "dsprites_procedural", "--batch-size", "4",
                                         "--out", str(tmp_path / "run"), *extra]))
    return gt.Run(args, torch.device("cpu"))


def test_discriminator_update_leaves_the_encoder_gradients_untouched(tmp_path):
    run = tiny_run(tmp_path)
    for _ in range(3):  # several full steps: no in-place autograd error (a known failure of FactorVAE ports)
        run.train_step()
    a = run.args
    classes, shares = gt.sample_groups(run.data.factor_sizes, run.content_factors, 4, 2, run.data_gen)
    x = run.data.images(classes.flatten(0, 1)).view(4, 2, 1, 64, 64)
    run.d_opt.zero_grad(set_to_none=True)
    run.D.requires_grad_(False)
    loss, terms, z = gt.group_objective("group_tcvae", run.vae, run.D, x, shares, a.beta, a.gamma, a.content_dims)
    run.vae_opt.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in run.D.parameters())  # the VAE's loss does not train D
    before = [p.grad.clone() for p in run.vae.parameters()]
    run.D.requires_grad_(True)
    d_loss, _ = gt.discriminator_loss(run.D, z, gt.permute_codes(z.detach(), run.blocks))
    run.d_opt.zero_grad()
    d_loss.backward()
    run.d_opt.step()
    assert all(torch.equal(b, p.grad) for b, p in zip(before, run.vae.parameters()))
    assert all(p.grad is not None for p in run.D.parameters())


def test_objectives_assemble_their_terms(tmp_path):
    run = tiny_run(tmp_path, "--beta", "3", "--gamma", "5")
    classes, shares = gt.sample_groups(run.data.factor_sizes, run.content_factors, 4, 2, run.data_gen)
    x = run.data.images(classes.flatten(0, 1)).view(4, 2, 1, 64, 64)
    for model in gt.MODELS:
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
