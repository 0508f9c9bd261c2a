"""grouptc: weakly-supervised group disentanglement using total correlation (group-tcVAE), in one file.

Paper: L. Tran, S. Asgari Taghanaki, A. H. Khasahmadi, A. Sanghi, "Weakly-supervised group disentanglement using
total correlation" (Autodesk AI Lab). Baselines: MLVAE (Bouchacourt et al. 2018) and GVAE (Hosoya 2019), with the
conventions of disentanglement_lib (Locatello et al. 2020) wherever the paper is silent.

Run:
    python grouptc.py --model group_tcvae --dataset dsprites               # the official file, downloaded if missing
    python grouptc.py --model group_tcvae --dataset dsprites_procedural    # built-in renderer, no download
    python grouptc.py --eval-only --out RUN --eval-samples 0               # re-evaluate a saved run on all points
    python grouptc.py --summarize runs/                                    # Figure 3(b), 3(c), 4 and results.md
    python grouptc.py --dataset dsprites_procedural --seed 0,1,2 --gamma 1,8   # a sweep: 6 runs trained together

Where each quantity of the paper lives:
    Eq. (1)  WS-ELBO of MLVAE / GVAE ........ group_objective(), with product_posterior() / average_posterior()
    Eq. (2)  TC(z_c, z_\\c) ................... tc_estimate() with the discriminator D; q-bar samples: permute_codes()
             the three factorisations ......... tc_blocks()  (inter | inter_intra | full)
    Eq. (3)  group-tcVAE objective ............ group_objective(): reconstruction(), kl_to_prior(), tc_estimate(),
                                                group_kl()
             discriminator loss ............... discriminator_loss()
    Sec. 4   MIG, group-MIG ................... mutual_info_matrix(), mig(), group_mig()
    Fig. 3a  MI matrix ........................ plot_mi_matrix()
    Fig. 3b, 3c, 4 ............................ summarize()
    Fig. 5   reconstructions, traversals ...... plot_reconstructions(), plot_traversals()

Sweeps (many runs in one process): Run holds S runs' stacked weights; Bound and over_runs() apply the one
group_objective() to each run's slice (a loop on the CPU, torch.func.vmap on accelerators); sweep_members().

Sections: errors and files -> data -> group sampler -> model -> objectives -> metrics -> training -> evaluation and
figures -> summary of a grid -> command line.
"""

import argparse
import contextlib
import copy
import csv
import errno
import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
import types
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

MODELS = ("group_tcvae", "mlvae", "gvae")
TC_LEVELS = ("inter", "inter_intra", "full")
DATASETS = ("dsprites", "shapes3d", "dsprites_procedural", "shapes3d_procedural")


# ----------------------------------------------------------------------------------------------------------------
# Errors: bad input from the user is a UserError, printed as one clear line by main(), never a traceback.
# ----------------------------------------------------------------------------------------------------------------
class UserError(Exception):
    """A problem with the user's input (a flag, a data file): the message says what was wrong and what was
    expected."""

    exit_code = 2


class RunFolderBusy(UserError):
    """Another live process holds the run folder (run_paper.sh's workers skip such a run: exit status 3)."""

    exit_code = 3


# ----------------------------------------------------------------------------------------------------------------
# Files: every result is written whole or not at all, and a run folder is held by one process at a time.
# ----------------------------------------------------------------------------------------------------------------
def write_atomic(path, write):
    """write(tmp) then rename tmp onto path: a crash, a Ctrl-C or a full disk leaves the old file or the new one,
    never half of one, and no temporary file. An OSError becomes a UserError naming the file and its disk."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise UserError(f"could not write {path}: {error.strerror or error}{_disk_note(path)}") from None
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

    def __exit__(self, *exc):
        os.close(self.fd)  # closing the descriptor releases the lock; the file stays (removing it would race)


# ----------------------------------------------------------------------------------------------------------------
# Data: every source gives factor classes -> images. Factors live in "class space": integer classes per factor,
# flattened to the row of the data set by a mixed-radix index (last factor fastest), as both official files do.
# ----------------------------------------------------------------------------------------------------------------
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


@functools.lru_cache(maxsize=None)
def device_constant(values, device, dtype=torch.long):
    """A small constant tensor made once per device: the training step then copies nothing from the host (which
    also lets the step be captured in a CUDA graph). `values` is a tuple; the tensor must not be modified."""
    return torch.tensor(values, device=device, dtype=dtype)


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
    description = ""

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
        sys.stderr.write(f"\r{label}: {done / max(total, 1):6.1%} ({done:,}/{total:,})" + ("\n" if done >= total else ""))
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
        centres = torch.arange(64, device=d, dtype=torch.float32) + 0.5
        self.y, self.x = torch.meshgrid(centres, centres, indexing="ij")  # (64, 64) pixel centres
        self.polygon = torch.tensor(self.HEART_POLYGON, device=d)

    def render(self, classes):
        c = classes
        shape, s = c[:, 0, None, None], self.scales[c[:, 1]][:, None, None]
        theta = self.angles[c[:, 2]][:, None, None]
        cx = 16 + 32 * self.positions[c[:, 3]][:, None, None]  # posX moves along columns
        cy = 16 + 32 * self.positions[c[:, 4]][:, None, None]  # posY along rows, row 0 at the top
        dx, dy = self.x - cx, self.y - cy  # (B, 64, 64)
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
        return on.unsqueeze(1).float()


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
# The group sampler: each group of observations shares every factor of ONE group of factors (content or
# non-content, each with probability 1/2); the factors of the other group are drawn anew for every member.
# ----------------------------------------------------------------------------------------------------------------
def uniform_classes(factor_sizes, shape, generator=None):
    """Factor classes drawn uniformly and independently: -> LongTensor (*shape, K) on the generator's device."""
    device = generator.device if generator is not None else torch.device("cpu")
    sizes = device_constant(tuple(factor_sizes), device)
    u = torch.rand(*shape, len(factor_sizes), generator=generator, device=device, dtype=torch.float64)
    return torch.minimum((u * sizes).long(), sizes - 1)  # the min guards u * size rounding up to size


def sample_groups(factor_sizes, content_factors, batch_size, group_size=2, generator=None):
    """-> classes (batch_size, group_size, K) LongTensor, shares_content (batch_size,) BoolTensor.
    Every draw comes from `generator` and lives on its device, so a seed reproduces the batch."""
    device = generator.device if generator is not None else torch.device("cpu")
    K = len(factor_sizes)
    classes = uniform_classes(factor_sizes, (batch_size, group_size), generator)  # independent for every member
    shares_content = torch.rand(batch_size, generator=generator, device=device) < 0.5
    is_content = device_constant(tuple(k in content_factors for k in range(K)), device, torch.bool)
    shared = is_content[None] == shares_content[:, None]  # (B, K): the factors this group shares
    classes = torch.where(shared[:, None, :], classes[:, :1, :], classes)  # copy the first member's classes
    return classes, shares_content


# ----------------------------------------------------------------------------------------------------------------
# Model: disentanglement_lib's conv encoder / deconv decoder (64x64 inputs), and the FactorVAE discriminator D.
# The latent z = (z_\c, z_c): z_\c the first latent_dim - content_dims dims, z_c the last content_dims (Fig. 3a).
# ----------------------------------------------------------------------------------------------------------------
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
# Shapes: B groups, G observations per group, L latent dims; mu, logvar (B, G, L).
# ----------------------------------------------------------------------------------------------------------------
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


def tc_blocks(level, latent_dim, content_dims):
    """Which dims are permuted together to sample the factorised q-bar of each TC level (Sec. 3), as a block id per
    dim (z_\\c first, z_c last): inter: [z_\\c][z_c]; inter_intra: every z_\\c dim alone, z_c one block; full:
    every dim alone (FactorVAE)."""
    n_s = latent_dim - content_dims
    if level == "inter":
        blocks = [0] * n_s + [1] * content_dims
    elif level == "inter_intra":
        blocks = list(range(n_s)) + [n_s] * content_dims
    elif level == "full":
        blocks = list(range(latent_dim))
    else:
        raise UserError(f"--tc-level: unknown level '{level}'; expected one of {', '.join(TC_LEVELS)}")
    return torch.tensor(blocks)


def permute_codes(z, blocks, generator=None, u=None):
    """Samples of q-bar: each block of dims gets its own random permutation of the N codes (rows).
    z (N, L), blocks (L,) long block ids in [0, L) -> (N, L). u: the (N, L) uniform noise that orders the
    permutations, drawn from `generator` when not given."""
    u = torch.rand(z.shape, generator=generator, device=z.device) if u is None else u
    perm = u.argsort(0)  # (N, L): one permutation per possible block
    return z.gather(0, perm[:, blocks.to(z.device)])  # dims of one block share their block's permutation


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


def group_objective(model, vae, D, x, shares_content, beta, gamma, content_dims, generator=None, eps=None):
    """The loss of one batch of groups, for all three models. x (B, G, C, 64, 64), shares_content (B,); eps
    (B, G, L) the reparameterisation noise, drawn from `generator` when not given.
    Returns (loss, terms, z): terms holds each term's value per image; z (B*G, L) the sampled codes.
    Every term is per image: the paper's sums over the G members of a group are averaged instead, as
    disentanglement_lib's 0.5 * (rec1 + rec2) does, so beta and gamma keep their meaning for any G."""
    B, G = x.shape[:2]
    mu, logvar = (t.float().view(B, G, -1) for t in vae.encode(x.flatten(0, 1)))
    shared = shared_dims(shares_content, mu.shape[-1], content_dims)  # (B, L)
    if model in ("mlvae", "gvae"):
        # Eq. (1): the shared group's dims take the group's aggregated posterior; the others keep their own.
        mu_g, logvar_g = (product_posterior if model == "mlvae" else average_posterior)(mu, logvar)
        mu, logvar = torch.where(shared[:, None], mu_g, mu), torch.where(shared[:, None], logvar_g, logvar)
    eps = torch.randn(mu.shape, generator=generator, device=mu.device) if eps is None else eps
    z = (mu + eps * (0.5 * logvar).exp()).flatten(0, 1)  # (B*G, L), reparameterised
    rec = reconstruction(vae.decode(z).float(), x.flatten(0, 1)).mean()
    kl = kl_to_prior(mu, logvar).sum(-1).mean()
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
# The histogram MI is Numba-jitted (cached on disk, compiled once).
# ----------------------------------------------------------------------------------------------------------------
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


def factor_entropy(factors):
    """Empirical entropy in nats of each factor: (N, K) -> (K,)."""
    labels, n_classes = _factor_labels(factors)
    H = np.zeros(labels.shape[1])
    for k, f in enumerate(labels.T):
        p = np.bincount(f, minlength=n_classes) / len(f)
        p = p[p > 0]
        H[k] = -(p * np.log(p)).sum()
    return H


def mutual_info_and_entropy(codes, factors, n_bins=20):
    """(L, K) plug-in MI in nats between each code dim, cut into n_bins equal-width bins between its min and max
    (numpy.histogram's edges, numpy.digitize's labels), and each factor; and the (K,) factor entropies.
    codes (N, L) float, factors (N, K) integer classes."""
    threads = torch.get_num_threads()
    try:
        return _mutual_info_and_entropy(codes, factors, n_bins)
    finally:  # Numba's OpenMP layer shares torch's OpenMP runtime and, starting its threads, sets its thread count
        # to every core (OMP_NUM_THREADS notwithstanding): training after an evaluation in the same process would
        # run on more threads than asked (oversubscribed where processes share the cores) and sum in another order
        torch.set_num_threads(threads)


def _mutual_info_and_entropy(codes, factors, n_bins):
    import numba
    codes = np.ascontiguousarray(codes, dtype=np.float64)
    if codes.ndim != 2 or len(codes) != len(factors) or len(codes) == 0:
        raise ValueError(f"codes must be (N, L) with N = len(factors) = {len(factors)} > 0, got {codes.shape}")
    kernel, ranges = _get_mi_kernel()
    lo, hi, n_bad = ranges(codes, numba.get_num_threads())
    lo, hi = lo.min(0), hi.max(0)
    if n_bad:
        raise ValueError(f"codes contain {n_bad} NaN or infinite values")
    labels, n_classes = _factor_labels(factors)
    # numpy.histogram's edges: linspace(min, max, n_bins + 1), widened by 0.5 on each side for a constant dim.
    flat = lo == hi
    lo, hi = np.where(flat, lo - 0.5, lo), np.where(flat, hi + 0.5, hi)
    edges = np.stack([np.linspace(a, b, n_bins + 1)[:-1] for a, b in zip(lo, hi)])  # (L, n_bins)
    return kernel(codes, edges, labels, n_classes, numba.get_num_threads())


def mutual_info_matrix(codes, factors, n_bins=20):
    """(L, K) plug-in MI in nats between each binned code dim and each factor (see mutual_info_and_entropy)."""
    return mutual_info_and_entropy(codes, factors, n_bins)[0]


def _gap_score(gaps, H):
    """mean over factors with H > 0 of gap / H; factors with one value are left out."""
    keep = H > 0
    return float(np.mean(gaps[keep] / H[keep]))


def mig_from_matrix(mi, H):
    """MIG from an (L, K) MI matrix and the (K,) factor entropies."""
    return _gap_score(mig_gaps(mi), H)


def mig_gaps(mi):
    """Per factor: the largest I(z_i; v_k) over the latents minus the second largest. (L, K) -> (K,)"""
    top = np.sort(mi, axis=0)[::-1]
    return top[0] - top[1]


def group_mig_from_matrix(mi, H, content_latents, content_factors):
    """group-MIG from an (L, K) MI matrix and the (K,) factor entropies (see group_mig)."""
    return _gap_score(group_gaps(mi, content_latents, content_factors), H)


def group_gaps(mi, content_latents, content_factors):
    """Per factor: max I over the latents of the factor's own group - max I over the other latents. (L, K) -> (K,)"""
    L, K = mi.shape
    own = np.isin(np.arange(L), content_latents)[:, None] == np.isin(np.arange(K), content_factors)[None, :]
    return np.where(own, mi, -np.inf).max(0) - np.where(~own, mi, -np.inf).max(0)


def mig(codes, factors, n_bins=20):
    """Mutual Information Gap (disentanglement_lib's discrete MIG): mean over factors of the gap between the two
    largest I(z_i; v_k), over H(v_k). Factors with one value are left out."""
    return mig_from_matrix(*mutual_info_and_entropy(codes, factors, n_bins))


def group_mig(codes, factors, content_latents, content_factors, n_bins=20):
    """group-MIG (paper, Sec. 4): mean over factors of (max I over the latents of the factor's own group - max I
    over the other latents) / H(v_k). Negative when information sits in the wrong group. content_latents: indices
    of the z_c dims; content_factors: indices of the content factors (columns of `factors`)."""
    mi, H = mutual_info_and_entropy(codes, factors, n_bins)
    return group_mig_from_matrix(mi, H, content_latents, content_factors)


# ----------------------------------------------------------------------------------------------------------------
# Arguments: every hyperparameter in one place, with its meaning and paper default.
# ----------------------------------------------------------------------------------------------------------------
MODEL_DEFAULTS = {  # beta, gamma per model when the flags are not given
    "group_tcvae": (10.0, 8.0),  # the paper's grid: beta {10..100}, gamma {1..64}; see README "Defaults"
    "mlvae": (1.0, 0.0),  # Locatello et al. 2020's grid {1, 2, 4, 6, 8, 16}: its first value
    "gvae": (1.0, 0.0),
}
# The flags that define what a run is; a resumed or re-evaluated run keeps them from its checkpoint.
RUN_DEFINING = ("model", "dataset", "batch_size", "group_size", "beta", "gamma", "tc_level", "content_factors",
                "latent_dim", "content_dims", "seed")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' only where X says something (not for None and switches)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:  # not `in (None, False)`: 0 == False
            return action.help
        return super()._get_help_string(action)


def build_parser(suppress_defaults=False):
    p = argparse.ArgumentParser(
        prog="grouptc.py", description="group-tcVAE, MLVAE and GVAE on paired observations; MIG and group-MIG.",
        formatter_class=_HelpFormatter)

    def a(*flags, **kw):
        if suppress_defaults:  # for telling which flags the user typed
            kw["default"] = argparse.SUPPRESS
        p.add_argument(*flags, **kw)

    a("--model", choices=MODELS, default="group_tcvae", help="objective: group-tcVAE Eq. (3), MLVAE or GVAE Eq. (1)")
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
    a("--group-size", type=int, default=2, help="observations per group (paper: pairs)")
    a("--beta", type=_values(float), default=None,
      help="group-tcVAE: weight of TC(z_c, z_\\c), paper grid {10,20,30,40,50,100}, default 10; MLVAE/GVAE: weight "
           "of the KL, Locatello's grid {1,2,4,6,8,16}, default 1. A comma-separated list makes a sweep (see --out)")
    a("--gamma", type=_values(float), default=None,
      help="group-tcVAE: weight of the KL between the members' shared-group posteriors ('lambda' in the paper's "
           "grid {1,8,16,32,64}), default 8; unused by MLVAE/GVAE. A comma-separated list makes a sweep")
    a("--tc-level", choices=TC_LEVELS, default="inter",
      help="factorisation of q-bar (Sec. 3): inter: q(z_c)q(z_\\c), the paper's objective; inter_intra: q(z_c) "
           "prod_i q(z_\\c,i); full: prod_i q(z_i) (FactorVAE). Recommended when MIG matters: full, the one "
           "setting of the README's CPU study ahead of MLVAE and GVAE on both MIG and group-MIG (3 seeds, narrowly)")
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
           "--out (default runs/MODEL-DATASET-sweep), named by its settings")
    a("--eval-samples", type=int, default=10_000,
      help="points for MIG / group-MIG (disentanglement_lib: 10,000); 0: every point of the data set")
    a("--resume", action="store_true", default=False,
      help="continue the run in --out from its checkpoint.pt (starts fresh when there is none)")
    a("--eval-only", action="store_true", default=False,
      help="no training: evaluate the checkpoint in --out again and rewrite metrics.json and the figures")
    a("--checkpoint-every", type=int, default=5_000, help="steps between checkpoints")
    a("--log-every", type=int, default=500, help="steps between progress lines and log.csv rows")
    a("--summarize", metavar="RUNS_DIR", default=None,
      help="no training: summarise every run under RUNS_DIR into Figures 3(b), 3(c), 4 and results.md")
    return p


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
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.given = set(vars(build_parser(suppress_defaults=True).parse_args(argv)))  # flags typed by the user
    return args


def finish_args(args):
    """Model defaults, default run folder, and checks with messages that name the flag. Lists in --seed, --beta or
    --gamma (or --resume on a sweep's folder) make a sweep: args.sweep, with the lists kept for sweep_members()."""
    if args.resume and args.out is not None and (Path(args.out) / "sweep.json").is_file():
        for key, value in read_config(Path(args.out) / "sweep.json").items():  # the sweep's flags, unless typed
            if key not in args.given and key in vars(args) and key not in ("resume", "eval_only", "out", "given"):
                setattr(args, key, value)
        args.sweep = True
    beta0, gamma0 = MODEL_DEFAULTS[args.model]
    as_list = lambda v, default: [default] if v is None else list(v) if isinstance(v, list) else [v]  # noqa: E731
    args.seed, args.beta, args.gamma = as_list(args.seed, 0), as_list(args.beta, beta0), as_list(args.gamma, gamma0)
    args.sweep = getattr(args, "sweep", False) or len(args.seed) * len(args.beta) * len(args.gamma) > 1
    if args.sweep:
        if args.out is None:
            args.out = f"runs/{args.model}-{args.dataset}-sweep"
        if args.eval_only:
            raise UserError(f"--eval-only evaluates one run: give --out one of the run folders under {args.out}")
        return args
    args.seed, args.beta, args.gamma = args.seed[0], args.beta[0], args.gamma[0]
    if args.out is None:
        args.out = f"runs/{args.model}-{args.dataset}-seed{args.seed}"
    return check_args(args)


def run_name(args):
    """A sweep's run folder, named by what sets the run apart (as run_paper.sh names its runs)."""
    return (f"{args.model}_beta{args.beta:g}_gamma{args.gamma:g}_gs{args.group_size}_tc-{args.tc_level}_"
            f"seed{args.seed}")


def sweep_members(args):
    """The runs of a sweep: every combination of its --seed, --beta and --gamma values, each with flags of its own
    (single values, checked as a run's) and its own folder under the sweep's --out."""
    members = []
    for seed, beta, gamma in itertools.product(args.seed, args.beta, args.gamma):
        m = copy.copy(args)
        m.seed, m.beta, m.gamma, m.sweep = seed, beta, gamma, False
        m.out = str(Path(args.out) / run_name(m))
        members.append(check_args(m))
    return members


# What each flag must hold; a config.json or checkpoint read back is checked against it too.
FLAG_TYPES = {"model": str, "dataset": str, "data_dir": str, "steps": int, "batch_size": int, "group_size": int,
              "beta": (int, float), "gamma": (int, float), "tc_level": str, "content_factors": (str, type(None)),
              "latent_dim": int, "content_dims": int, "seed": int, "device": str, "eval_samples": int,
              "checkpoint_every": int, "log_every": int}


def check_args(args):
    """Every check with a message that names the flag; also run on flags read back from a run folder."""
    for flag, kind in FLAG_TYPES.items():
        value = getattr(args, flag)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UserError(f"--{flag.replace('_', '-')} must be {getattr(kind, '__name__', 'a number')}, "
                            f"got {value!r}")
    for flag, choices in (("model", MODELS), ("dataset", DATASETS), ("tc_level", TC_LEVELS)):
        if getattr(args, flag) not in choices:
            raise UserError(f"--{flag.replace('_', '-')} must be one of {', '.join(choices)}, got "
                            f"{getattr(args, flag)!r}")
    check_device_name(args.device)
    for flag in ("steps", "batch_size", "latent_dim", "content_dims", "checkpoint_every", "log_every"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.group_size < 2:
        raise UserError(f"--group-size must be at least 2 (a group of observations), got {args.group_size}")
    if args.eval_samples < 0 or args.eval_samples == 1:
        raise UserError(f"--eval-samples must be 0 (all points) or at least 2 (disentanglement_lib: 10,000), got "
                        f"{args.eval_samples}")
    for flag in ("beta", "gamma"):
        if not math.isfinite(getattr(args, flag)) or getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be a non-negative number, got {getattr(args, flag)}")
    if args.content_dims >= args.latent_dim:
        raise UserError(f"--content-dims ({args.content_dims}) must be smaller than --latent-dim "
                        f"({args.latent_dim}): both latent groups need at least one dim")
    return args


def check_device_name(name):
    """The spelling of --device, before anything is built (whether it is present is resolve_device's job)."""
    if name == "auto":
        return
    try:
        kind = torch.device(name).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device: unsupported device '{name}'; expected auto, cpu, cuda, cuda:N or mps")


def resolve_device(name):
    check_device_name(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available on this machine; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available on this machine; use --device cpu or auto")
    return device


# ----------------------------------------------------------------------------------------------------------------
# Training: data, sampling and the step stay on the device; the host only looks when logging or checkpointing.
# ----------------------------------------------------------------------------------------------------------------
TERMS = {"group_tcvae": ("loss", "rec", "kl", "tc", "group_kl", "d_loss", "d_acc"),
         "mlvae": ("loss", "rec", "kl"), "gvae": ("loss", "rec", "kl")}


class Bound:
    """A module computed with other parameters (torch.func.functional_call): one definition of the networks serves
    every run of a sweep, each with its slice of the stacked weights. Bound(vae, p).encode(x) runs VAE.encode."""

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


def over_runs(f, batched, *args):
    """f applied to run k's slice (index k of dim 0) of every argument (tensors, or dicts of them; a list is
    already one entry per run), for every run; backpropagates each run's first output (its loss) and returns the
    outputs, detached, stacked on dim 0. batched: one torch.func.vmap call, a few large kernels (GPUs); otherwise a
    loop over the runs (CPUs, where vmap's grouped convolutions are slower than one convolution per run), each
    run's backward right after its forward, so that one run's activations at a time fill the caches."""
    if batched:
        outs = torch.func.vmap(f)(*args)
        outs[0].sum().backward()  # each run's weights get exactly the gradient of its own loss
        return tuple(o.detach() for o in outs)
    take = lambda a, k: a[k] if isinstance(a, list) else {n: t[k] for n, t in a.items()} if isinstance(a, dict) \
        else a[k]  # noqa: E731
    outs = []
    for k in range(len(args[-1])):
        out = f(*(take(a, k) for a in args))
        out[0].backward()
        outs.append([o.detach() for o in out])
    return tuple(torch.stack(o) for o in zip(*outs))


def stack_params(modules, batched):
    """S modules of one definition -> (stacked, trained). stacked: {name: (S, ...) tensor}, the weights of S runs
    as one set. trained: what gets gradients and what the optimiser updates. Batched (vmap), the stacked tensors
    themselves. Looping, a list of each run's {name: slice}: views of the stacked storage, leaves of their own, so
    that each run's gradient is its own tensor, as alone (a gradient of the stacked tensors would be assembled
    from the S runs' gradients, one large copy per weight and step)."""
    stacked = {n: p.detach() for n, p in torch.func.stack_module_state(modules)[0].items()}
    if batched:
        return stacked, {n: p.requires_grad_() for n, p in stacked.items()}
    return stacked, [{n: p[k].requires_grad_() for n, p in stacked.items()} for k in range(len(modules))]


def leaves(trained):
    """The tensors an optimiser updates, from stack_params' trained: run by run when it is a list."""
    return [p for run in trained for p in run.values()] if isinstance(trained, list) else list(trained.values())


class Run:
    """The runs of one process, trained together: S runs that share model, data set and shapes and differ in seed,
    beta and gamma (S = 1: an ordinary run). Run k has its own flags and folder (members[k]), its own generators,
    and its own slice of the stacked weights and of the optimiser's states (Adam is elementwise, so one Adam over
    the stacked weights, or over every run's slices, is each run's own Adam): it computes what it would alone.
    One step trains all of them."""

    BATCHED = None  # None: vmap the runs on accelerators, loop over them on the CPU; True / False: always

    def __init__(self, members, device):
        members = members if isinstance(members, (list, tuple)) else [members]
        self.members, self.args, self.device = list(members), members[0], device
        args = self.args
        self.data = load_dataset(args.dataset, args.data_dir, device, args.allow_subgrid)
        names = args.content_factors if args.content_factors is not None else self.data.content_factors
        self.content_factors = resolve_factors(names, list(self.data.factor_names))
        vaes, Ds = [], []
        for m in self.members:
            torch.manual_seed(m.seed)  # network initialisation, as the run alone would draw it
            vaes.append(VAE(self.data.channels, args.latent_dim).to(device))
            Ds.append(Discriminator(args.latent_dim).to(device) if args.model == "group_tcvae" else None)
        self.vae, self.D = vaes[0], Ds[0]  # the definitions; the weights live in vae_params, d_params
        self.use_graph, self.graph, self.warmup_steps = device.type == "cuda" and not args.eager, None, 0
        self.batched = (device.type != "cpu" and len(self) > 1) if self.BATCHED is None else self.BATCHED
        self.vae_params, self.vae_trained = stack_params(vaes, self.batched)
        self.d_params, self.d_trained = stack_params(Ds, self.batched) if self.D is not None else ({}, {})
        # CUDA: fused, capturable Adam (one kernel, inside the CUDA graph). CPU: the default Adam, which computes the
        # runs of docs/cpu_study byte for byte; the fused one was 0-4% faster there and rounds differently.
        fused = {"fused": True, "capturable": self.use_graph} if device.type == "cuda" else {}
        self.vae_opt = torch.optim.Adam(leaves(self.vae_trained), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, **fused)
        self.d_opt = (torch.optim.Adam(leaves(self.d_trained), lr=1e-4, betas=(0.5, 0.9), **fused)
                      if self.D is not None else None)
        self.data_gens = [torch.Generator(device=device).manual_seed(m.seed) for m in self.members]  # groups
        self.model_gens = [torch.Generator(device=device).manual_seed(m.seed + 1_000_003)  # noise, permutations
                           for m in self.members]
        self.beta = torch.tensor([float(m.beta) for m in self.members], device=device)
        self.gamma = torch.tensor([float(m.gamma) for m in self.members], device=device)
        self.blocks = tc_blocks(args.tc_level, args.latent_dim, args.content_dims).to(device)
        self.step, self.train_seconds = 0, [0.0] * len(self.members)
        if args.compile:  # in place: the parameter names stay, so checkpoints load either way
            for module in (self.vae.encoder, self.vae.decoder, self.D):
                if module is not None:
                    module.compile()
        self.amp = device.type == "cuda"  # bf16 autocast on CUDA; the TC log-ratio stays fp32

    def __len__(self):
        return len(self.members)

    def sample_batch(self):
        """A fresh batch of groups for every run, from its own generators: x (S, B, G, C, 64, 64), shares_content
        (S, B), eps (S, B, G, L) and the permutations' noise u (S, B*G, L), drawn in the order the run alone draws
        them; the images of all runs rendered in one call."""
        B, G, L = self.args.batch_size, self.args.group_size, self.args.latent_dim
        classes, shares, eps, u = [], [], [], []
        for data_gen, model_gen in zip(self.data_gens, self.model_gens):
            c, s = sample_groups(self.data.factor_sizes, self.content_factors, B, G, data_gen)
            classes.append(c)
            shares.append(s)
            eps.append(torch.randn((B, G, L), generator=model_gen, device=self.device))
            if self.D is not None:
                u.append(torch.rand((B * G, L), generator=model_gen, device=self.device))
        x = self.data.images(torch.cat(classes).flatten(0, 1)).view(len(self), B, G, self.data.channels, 64, 64)
        u = torch.stack(u) if u else torch.zeros(len(self), 0, device=self.device)
        return x, torch.stack(shares), torch.stack(eps), u

    def update(self, x, shares_content, eps, u):
        """One optimisation step of every run's VAE (and D for group-tcVAE) -> (S, n_terms) tensor of its terms."""
        a = self.args
        frozen_d = {n: p.detach() for n, p in self.d_params.items()}  # the VAE's loss moves the encoder through D,
        # never D itself

        autocast = functools.partial(torch.autocast, self.device.type, dtype=torch.bfloat16, enabled=self.amp,
                                     cache_enabled=False)  # the forward passes only

        def vae_loss(vae_p, d_p, x, shares, eps, beta, gamma):
            with autocast():
                D = Bound(self.D, d_p) if self.D is not None else None
                loss, terms, z = group_objective(a.model, Bound(self.vae, vae_p), D, x, shares, beta, gamma,
                                                 a.content_dims, eps=eps)
            return loss, torch.stack(list(terms.values())), z

        self.vae_opt.zero_grad(set_to_none=True)
        loss, terms, z = over_runs(vae_loss, self.batched, self.vae_trained, frozen_d, x, shares_content, eps,
                                   self.beta, self.gamma)
        self.vae_opt.step()
        values = [loss[:, None], terms]
        if self.D is not None:
            def d_loss(d_p, z, u):
                with autocast():
                    return discriminator_loss(Bound(self.D, d_p), z, permute_codes(z, self.blocks, u=u))

            self.d_opt.zero_grad(set_to_none=True)
            d_losses, d_acc = over_runs(d_loss, self.batched, self.d_trained, z, u)
            self.d_opt.step()
            values += [d_losses[:, None], d_acc[:, None]]
        return torch.cat([v.float() for v in values], 1)

    def _step_values(self):
        return self.update(*self.sample_batch())

    def train_step(self):
        """One step of every run on fresh batches -> (S, n_terms) detached tensor of the step's terms.
        On CUDA the whole step (sampling, rendering, both updates of every run) is captured once in a CUDA graph
        after a few eager warm-up steps and replayed: one launch instead of hundreds, the same computation."""
        if self.graph is not None:
            self.graph.replay()
            values = self.graph_values.clone()
        elif self.use_graph and self.warmup_steps >= 3:
            values = self._capture_and_replay()
        elif self.use_graph:  # warm-up (lazy optimiser state, cuBLAS handles) on a side stream, as CUDA asks
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                values = self._step_values()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.warmup_steps += 1
        else:
            values = self._step_values()
        self.step += 1
        return values

    def _capture_and_replay(self):
        graph = torch.cuda.CUDAGraph()
        for generator in (*self.data_gens, *self.model_gens):
            graph.register_generator_state(generator)  # each replay draws fresh numbers
        try:
            with torch.cuda.graph(graph):
                self.graph_values = self._step_values()
        except RuntimeError as error:  # speed only: the eager step computes the same thing
            print(f"warning: CUDA graph capture failed ({error}); training continues without it", file=sys.stderr)
            self.use_graph = False
            return self._step_values()
        self.graph = graph
        graph.replay()  # capturing records the step without running it
        return self.graph_values.clone()

    # -- one run's share: its networks, and its checkpoint in the format of a run alone -------------------------
    def view(self, k):
        """Run k alone, as evaluation and the figures see a run: its flags, its step, and its VAE as a module of
        its own holding a copy of its weights."""
        vae = VAE(self.data.channels, self.args.latent_dim).to(self.device)
        vae.load_state_dict({n: p[k].detach() for n, p in self.vae_params.items()})
        return types.SimpleNamespace(args=self.members[k], vae=vae, data=self.data, device=self.device, step=self.step,
                                     content_factors=self.content_factors, train_seconds=self.train_seconds[k])

    def state(self, k, log_sum, log_count):
        """Run k's checkpoint: the same keys, shapes and optimiser state a run alone saves."""
        return {"step": self.step, "train_seconds": self.train_seconds[k], "args": public_args(self.members[k]),
                "vae": {n: p[k].detach().clone() for n, p in self.vae_params.items()},
                "vae_opt": _optimizer_slice(self.vae_opt, k, self.batched, len(self)),
                "D": {n: p[k].detach().clone() for n, p in self.d_params.items()} if self.D is not None else None,
                "d_opt": _optimizer_slice(self.d_opt, k, self.batched, len(self)) if self.D is not None else None,
                "data_gen": self.data_gens[k].get_state(), "model_gen": self.model_gens[k].get_state(),
                "torch_rng": torch.get_rng_state(), "log_sum": log_sum, "log_count": log_count}

    def save(self, k, path, log_sum, log_count):
        state = self.state(k, log_sum, log_count)  # tensors and plain types only: it loads with weights_only=True
        write_atomic(path, lambda tmp: torch.save(state, tmp))

    def load(self, checkpoints, paths):
        """Each run's checkpoint (None: a run starting at step 0) into its slice. Runs resumed together must stand
        at the same step (they share one step counter, and batched, one Adam step count per stacked tensor)."""
        loaded = [(k, c) for k, c in enumerate(checkpoints) if c is not None]
        if not loaded:
            return
        steps = {c["step"] for _, c in loaded}
        if len(steps) != 1 or len(loaded) != len(self):
            raise UserError(f"runs trained together must stand at one step; these stand at {sorted(steps)}"
                            + ("" if len(loaded) == len(self) else " and 0"))
        k = 0
        try:
            for k, c in loaded:
                with torch.no_grad():
                    for name, p in self.vae_params.items():
                        p[k].copy_(c["vae"][name])
                    for name, p in self.d_params.items():
                        p[k].copy_(c["D"][name])
                try:
                    self.data_gens[k].set_state(c["data_gen"])
                    self.model_gens[k].set_state(c["model_gen"])
                except RuntimeError:  # saved on another kind of device: its generator states do not fit these
                    print(f"note: the checkpoint's generators belong to another device; continuing with generators "
                          f"seeded from --seed and step {c['step']}", file=sys.stderr)
                    self.data_gens[k].manual_seed(self.members[k].seed + 2 * c["step"])
                    self.model_gens[k].manual_seed(self.members[k].seed + 2 * c["step"] + 1)
                self.train_seconds[k] = c["train_seconds"]
            _optimizer_stack(self.vae_opt, [c["vae_opt"] for _, c in loaded], self.batched)
            if self.D is not None:
                _optimizer_stack(self.d_opt, [c["d_opt"] for _, c in loaded], self.batched)
            torch.set_rng_state(loaded[0][1]["torch_rng"])
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as error:
            raise UserError(f"the checkpoint {paths[k]} does not fit the run its flags describe "
                            f"({type(error).__name__}: {str(error).splitlines()[0]})") from None
        self.step = steps.pop()


def _optimizer_slice(opt, k, batched, S):
    """Run k's share of the Adam of S runs (over stacked weights when batched, else over run 0's weights, then run
    1's, ...), as the state_dict of an Adam over its own weights."""
    sd = opt.state_dict()
    groups = [dict(g, params=list(range(len(g["params"]) // (1 if batched else S)))) for g in sd["param_groups"]]
    n = len(groups[0]["params"])
    if batched:
        state = {i: {name: (v if name == "step" else v[k]).detach().clone() for name, v in s.items()}
                 for i, s in sd["state"].items()}
    else:
        state = {i: {name: v.detach().clone() for name, v in sd["state"][k * n + i].items()}
                 for i in range(n) if k * n + i in sd["state"]}
    return {"state": state, "param_groups": groups}


def _optimizer_stack(opt, state_dicts, batched):
    """The inverse: the Adam states of S runs (one step count) into the Adam of the S runs."""
    first, S = state_dicts[0], len(state_dicts)
    n = len(first["param_groups"][0]["params"])
    if batched:
        state = {i: {name: (v if name == "step" else torch.stack([sd["state"][i][name] for sd in state_dicts]))
                     for name, v in s.items()} for i, s in first["state"].items()}
    else:
        state = {k * n + i: {name: v.clone() for name, v in s.items()}  # its own memory, not the checkpoint's
                 for k, sd in enumerate(state_dicts) for i, s in sd["state"].items()}
    # the saved hyperparameters (lr, betas, eps), this optimiser's implementation (fused, capturable: the device's)
    own = opt.param_groups[0]
    groups = [dict(g, params=list(range(len(g["params"]) * (1 if batched else S))),
                   **{key: own[key] for key in ("fused", "capturable", "foreach", "differentiable") if key in own})
              for g in first["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def public_args(args):
    return {k: v for k, v in vars(args).items() if k not in ("given", "sweep")}


class StopRequest:
    """Ctrl-C / SIGTERM: the first asks the loop to checkpoint after the current step; the second stops at once."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing this step and writing a checkpoint (again to stop at once)", file=sys.stderr)


CHECKPOINT_KEYS = ("step", "train_seconds", "args", "vae", "vae_opt", "D", "d_opt", "data_gen", "model_gen",
                   "torch_rng", "log_sum", "log_count")


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
    """Read what args.out already holds, for a run about to train there -> its checkpoint (None: from step 0), or
    False when the run is finished. The folder's config.json defines its run: --resume continues it from its
    checkpoint, or restarts it from step 0 when it died before its first checkpoint."""
    out = Path(args.out)
    ckpt_path, config_path = out / "checkpoint.pt", out / "config.json"
    checkpoint = load_checkpoint(ckpt_path) if args.resume and ckpt_path.exists() else None
    if not args.resume and (ckpt_path.exists() or config_path.exists() or (out / "metrics.json").exists()):
        raise UserError(f"--out {out} already holds a run; pass --resume to continue it, or choose another --out")
    if checkpoint is not None:
        merge_saved_args(args, checkpoint["args"], ckpt_path)  # the saved --device too, unless typed anew
        if args.steps < checkpoint["step"]:
            raise UserError(f"--steps {args.steps} is below the {checkpoint['step']:,} steps the run in {out} has "
                            f"trained; give --steps {checkpoint['step']} or more (or leave it out)")
        if args.steps == checkpoint["step"] and (out / "metrics.json").exists():
            print(f"{out} is finished ({args.steps:,} steps, evaluated); nothing to do. --eval-only evaluates it "
                  "again", file=sys.stderr)
            return False
    elif args.resume and config_path.exists():
        merge_saved_args(args, read_config(config_path), config_path)
        print(f"{out} has no checkpoint (its run stopped before the first one): restarting the run its config.json "
              "defines from step 0", file=sys.stderr)
    return checkpoint


class RunLog:
    """A run's log.csv (one row every --log-every steps) and, in a sweep, its own copy of the progress lines
    (train.log), since the terminal shows the sweep's."""

    def __init__(self, args, names, step, sweep):
        self.out, self.names, self.sweep = Path(args.out), names, sweep
        path = self.out / "log.csv"
        rows = read_log(path) if path.exists() and step > 0 else []
        rows = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= step]  # rows after the
        # checkpoint are dropped (and so is a row a crash cut short)

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["step", *names, "ms_per_step"])
                writer.writerows([[r["step"], *[r[n] for n in names], r["ms_per_step"]] for r in rows])
        write_atomic(path, write)

    def row(self, step, means, ms):
        with open(self.out / "log.csv", "a", newline="") as f:
            csv.writer(f).writerow([step, *[f"{v:.6g}" for v in means], f"{ms:.2f}"])

    def say(self, line):
        if self.sweep:
            with open(self.out / "train.log", "a") as f:
                f.write(line + "\n")


def progress_line(step, total, names, means, ms):
    eta = ms * (total - step) / 1000
    return (f"step {step:>{len(str(total))}}/{total}  " + "  ".join(f"{n} {v:.4g}" for n, v in zip(names, means)) +
            f"  {ms:.1f} ms/step  ETA {format_seconds(eta)}")


def train(members, sweep=False):
    """Train a set of runs together (one: an ordinary run, unless sweep says it belongs to one), each into its own
    folder (held by this process).
    Returns (Run, the indices of the runs that trained to the end), or None when every run was finished before.
    Writes each run's config.json, log.csv and checkpoint.pt; a run whose loss goes NaN stops alone."""
    members = members if isinstance(members, list) else [members]
    checkpoints = [prepare_run(m) for m in members]
    members = [m for m, c in zip(members, checkpoints) if c is not False]
    checkpoints = [c for c in checkpoints if c is not False]
    if not members:
        return None
    a, S, sweep = members[0], len(members), sweep or len(members) > 1
    device = resolve_device(a.device)
    run = Run(members, device)
    names = TERMS[a.model]
    log_sum, log_count = torch.zeros(S, len(names), device=device), 0
    ckpt_paths = [Path(m.out) / "checkpoint.pt" for m in members]
    if any(c is not None for c in checkpoints):
        run.load(checkpoints, ckpt_paths)
        log_sum = torch.stack([c["log_sum"] for c in checkpoints]).to(device)
        log_count = checkpoints[0]["log_count"]
        print(f"resuming {a.out if not sweep else f'{S} run' + 's' * (S > 1)} at step {run.step:,}", file=sys.stderr)
    logs = []
    for m in members:
        write_text_atomic(Path(m.out) / "config.json", json.dumps(public_args(m), indent=2) + "\n")
        logs.append(RunLog(m, names, run.step, sweep))
    alive = list(range(S))

    stop = StopRequest()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    what = (f"{S} run{'s' * (S > 1)} (seed {', '.join(sorted({f'{m.seed}' for m in members}, key=int))}; beta "
            f"{', '.join(sorted({f'{m.beta:g}' for m in members}, key=float))}" +
            (f"; gamma {', '.join(sorted({f'{m.gamma:g}' for m in members}, key=float))}"
             if a.model == "group_tcvae" else "") + ")" if sweep else
            f"beta {a.beta:g}" + (f", gamma {a.gamma:g}" if a.model == "group_tcvae" else ""))
    print(f"training {a.model} on {run.data.name} ({device}): {a.steps:,} steps of {a.batch_size} groups of "
          f"{a.group_size}, {what}" + (f", TC level {a.tc_level}" if a.model == "group_tcvae" else ""),
          file=sys.stderr)
    last_step, last_time = run.step, time.perf_counter()
    try:
        while run.step < a.steps and not stop.requested and alive:
            log_sum += run.train_step()
            log_count += 1
            at_log, at_ckpt = run.step % a.log_every == 0 or run.step == a.steps, run.step % a.checkpoint_every == 0
            if not (at_log or at_ckpt):
                continue
            means = (log_sum / max(log_count, 1)).tolist()  # the one host sync, every log / checkpoint step
            now = time.perf_counter()
            for k in alive:
                run.train_seconds[k] += now - last_time
            for k in list(alive):
                if all(math.isfinite(v) for v in means[k]):
                    continue
                message = (f"the loss became NaN or infinite between steps {last_step:,} and {run.step:,} "
                           f"({dict(zip(names, means[k]))}); stopped. The last good checkpoint is kept at "
                           f"{ckpt_paths[k] if ckpt_paths[k].exists() else '(none written yet)'}")
                if not sweep:
                    raise UserError(message)
                logs[k].say(message)
                print(f"{members[k].out}: {message}; the other runs go on", file=sys.stderr)
                alive.remove(k)
            ms = 1000 * (now - last_time) / max(run.step - last_step, 1)
            if at_log:
                for k in alive:
                    logs[k].row(run.step, means[k], ms)
                    logs[k].say(progress_line(run.step, a.steps, names, means[k], ms))
                if not sweep:
                    print(progress_line(run.step, a.steps, names, means[0], ms), file=sys.stderr)
                elif alive:
                    loss = np.array([means[k][0] for k in alive])
                    print(progress_line(run.step, a.steps, [f"{len(alive)}/{S} runs, loss min", "median", "max"],
                                        [loss.min(), np.median(loss), loss.max()], ms), file=sys.stderr)
                log_sum, log_count = torch.zeros_like(log_sum), 0
            if at_ckpt or run.step == a.steps:
                for k in alive:
                    run.save(k, ckpt_paths[k], log_sum[k], log_count)
            last_step, last_time = run.step, time.perf_counter()
        for k in alive:
            run.train_seconds[k] += time.perf_counter() - last_time
        if stop.requested:
            for k in alive:
                if torch.isfinite(log_sum[k]).all():
                    run.save(k, ckpt_paths[k], log_sum[k], log_count)
            where = a.out if not sweep else Path(a.out).parent
            print(f"stopped at step {run.step:,}; checkpoint{'s' if sweep else ''} written. Continue with: "
                  f"python grouptc.py --resume --out {where}", file=sys.stderr)
            raise SystemExit(130)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return run, alive


def merge_saved_args(args, saved, path):
    """A resumed or re-evaluated run keeps its saved flags; a run-defining flag typed anew must agree. The merged
    flags pass the same checks as typed ones."""
    known = set(vars(args))
    for key, value in saved.items():
        if key not in known or key in ("given", "resume", "eval_only", "out", "summarize"):
            continue
        typed = getattr(args, key)
        if key in args.given and key in RUN_DEFINING and typed is not None and not _same_flag(key, typed, value,
                                                                                                saved):
            raise UserError(f"--{key.replace('_', '-')} {typed} differs from the run in {path.parent} "
                            f"({value}); leave it out to keep the saved value, or use another --out")
        if key not in args.given:
            setattr(args, key, value)
    try:
        check_args(args)
    except UserError as error:
        raise UserError(f"{path} holds a flag this program refuses: {error}") from None


def _same_flag(key, typed, saved_value, saved):
    """Whether a flag typed anew says what the saved one says (the default content factors, typed out, do)."""
    if key != "content_factors":
        return typed == saved_value
    defaults = DEFAULT_CONTENT.get(saved.get("dataset"), ())
    names = lambda v: set(defaults) if v is None else {n.strip() for n in str(v).split(",") if n.strip()}
    return names(typed) == names(saved_value)


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and figures.
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_means(vae, data, classes, batch=1024):
    """(N, K) classes -> (N, L) encoder means as float64 numpy, encoded in batches on the data's device."""
    vae.eval()
    codes = []
    for i in range(0, len(classes), batch):
        codes.append(vae.encode(data.images(classes[i:i + batch]))[0].float().cpu())
        _progress(f"encoding {len(classes):,} points", i + len(codes[-1]), len(classes))
    vae.train()
    return torch.cat(codes).double().numpy()


def evaluate(run, n_samples, seed=0):
    """MIG and group-MIG of the encoder means of n_samples uniform random points (0: every point)."""
    data, a = run.data, run.args
    if n_samples == 0:
        classes = index_to_classes(torch.arange(data.num_points, device=run.device), data.factor_sizes)
    else:
        gen = torch.Generator(device=run.device).manual_seed(seed + 7)
        classes = uniform_classes(data.factor_sizes, (n_samples,), gen)
    t0 = time.perf_counter()
    codes = encode_means(run.vae, data, classes)
    factors = classes.cpu().numpy()
    mi, H = mutual_info_and_entropy(codes, factors)
    content_latents = list(range(a.latent_dim - a.content_dims, a.latent_dim))
    metrics = {
        "mig": mig_from_matrix(mi, H),
        "group_mig": group_mig_from_matrix(mi, H, content_latents, run.content_factors),
        "mi_matrix": mi.tolist(), "factor_entropy": H.tolist(), "factor_names": list(data.factor_names),
        "content_factors": [data.factor_names[k] for k in run.content_factors], "content_latents": content_latents,
        "model": a.model, "dataset": a.dataset, "steps": run.step, "train_seconds": round(run.train_seconds, 3),
        "eval_samples": len(codes), "eval_seconds": round(time.perf_counter() - t0, 3),
        "beta": a.beta, "gamma": a.gamma, "group_size": a.group_size, "tc_level": a.tc_level, "seed": a.seed,
    }
    return metrics, codes


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi):
    """Write a figure as PNG atomically (never a 0-byte or half-written picture), then free it."""
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        _plt().close(fig)


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
    ax.set_title(f"{metrics['model']} on {metrics['dataset']}: normalised MI I(z;v)/H(v)\n"
                 f"MIG {metrics['mig']:.3f}   group-MIG {metrics['group_mig']:.3f}", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
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
    fig.tight_layout()
    save_figure(fig, path, dpi)


@torch.no_grad()
def plot_reconstructions(run, path, n_groups=8, seed=0):
    """Figure 5(a, c): each row one group of observations (left) and their reconstructions from the encoder
    means (right)."""
    a, data = run.args, run.data
    gen = torch.Generator(device=run.device).manual_seed(seed + 11)
    classes, shares = sample_groups(data.factor_sizes, run.content_factors, n_groups, a.group_size, gen)
    x = data.images(classes.flatten(0, 1))
    run.vae.eval()
    rec = torch.sigmoid(run.vae.decode(run.vae.encode(x)[0]).float())
    run.vae.train()
    G = a.group_size
    both = torch.cat([x.view(n_groups, G, *x.shape[1:]), rec.view(n_groups, G, *x.shape[1:])], 1)
    labels = ["shares c" if s else "shares \\c" for s in shares.tolist()]
    _image_figure(tile(both), path, labels, f"{G} observations of a group | their reconstructions", n_groups, 2 * G)


@torch.no_grad()
def plot_traversals(run, codes, path, n_steps=9, seed=0):
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
    _image_figure(tile(imgs), path, labels, "traversals: row i varies z_i (1st to 99th percentile)", L, n_steps)


def plot_training_curves(log_path, path):
    plt = _plt()
    rows = read_log(log_path)
    if not rows:
        return
    names = [n for n in rows[0] if n not in ("step", "ms_per_step")]
    steps = [int(r["step"]) for r in rows]
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.6), squeeze=False)
    for ax, n in zip(axes[0], names):
        ax.plot(steps, [float(r[n]) for r in rows], lw=1.2)
        ax.set_title(n, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    save_figure(fig, path, 90)


def evaluate_and_plot(run, out, n_samples):
    out = Path(out)
    print(f"evaluating on {n_samples or run.data.num_points:,} points", file=sys.stderr)
    metrics, codes = evaluate(run, n_samples, run.args.seed)
    if not all(math.isfinite(metrics[k]) for k in ("mig", "group_mig")):
        raise UserError(f"the evaluation on {metrics['eval_samples']:,} points gave MIG {metrics['mig']} and group-MIG "
                        f"{metrics['group_mig']} (every factor took a single value there); nothing was written. "
                        f"Evaluate on more points: --eval-only --out {out} --eval-samples 10000")
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=1, allow_nan=False) + "\n")
    plot_mi_matrix(metrics, out / "mi_matrix.png")
    plot_reconstructions(run, out / "reconstructions.png", seed=run.args.seed)
    plot_traversals(run, codes, out / "traversals.png", seed=run.args.seed)
    if (out / "log.csv").exists():
        plot_training_curves(out / "log.csv", out / "training_curves.png")
    print(f"MIG {metrics['mig']:.4f}  group-MIG {metrics['group_mig']:.4f}  -> {out}/metrics.json", file=sys.stderr)
    return metrics


def train_sweep(args):
    """A sweep: its runs trained together, then each evaluated into its own folder. The sweep's folder holds
    sweep.json (its flags: --resume on it continues every unfinished run) and a folder per run, each a run in its
    own right (--resume, --eval-only, --summarize work on it alone). Runs that stand at different steps (one was
    resumed alone, say) train in turn, each set together. Returns the exit status: 2 if a run's loss went NaN."""
    out = Path(args.out)
    if not args.resume and (out / "sweep.json").exists():
        raise UserError(f"--out {out} already holds a sweep; pass --resume to continue it, or choose another --out")
    members = sweep_members(args)
    with contextlib.ExitStack() as held:
        held.enter_context(RunFolderLock(out))
        for m in members:
            held.enter_context(RunFolderLock(m.out))
        flags = public_args(args) | {"resume": False}
        write_text_atomic(out / "sweep.json", json.dumps(flags, indent=2) + "\n")
        steps = {}
        for m in members:  # set apart by the step each stands at (what is finished or fresh is sorted by train())
            ckpt = Path(m.out) / "checkpoint.pt"
            steps.setdefault(load_checkpoint(ckpt)["step"] if args.resume and ckpt.exists() else 0, []).append(m)
        failed = 0
        for step in sorted(steps):
            trained = train(steps[step], sweep=True)
            if trained is None:
                continue
            run, alive = trained
            failed += len(run) - len(alive)
            for k in alive:
                evaluate_and_plot(run.view(k), run.members[k].out, args.eval_samples)
    if failed:
        print(f"{failed} of {len(members)} runs stopped on a NaN or infinite loss (see their train.log)",
              file=sys.stderr)
    return 2 if failed else 0


def eval_only(args):
    out = Path(args.out)
    ckpt_path = out / "checkpoint.pt"
    checkpoint = load_checkpoint(ckpt_path)
    merge_saved_args(args, checkpoint["args"], ckpt_path)
    run = Run([args], resolve_device(args.device))
    run.load([checkpoint], [ckpt_path])
    return evaluate_and_plot(run.view(0), out, args.eval_samples)


# ----------------------------------------------------------------------------------------------------------------
# Summary of a grid of runs: Figure 4 (densities), Figure 3(b) (content vs non-content), Figure 3(c) (group size).
# ----------------------------------------------------------------------------------------------------------------
def _legend(ax):
    if ax.get_legend_handles_labels()[0]:  # an empty legend is a matplotlib warning
        ax.legend(fontsize=8)


def _density(values, grid):
    """Gaussian kernel density with Scott's bandwidth (a floor keeps one-valued sets visible)."""
    values = np.asarray(values, float)
    bw = max(1.06 * values.std() * len(values) ** -0.2, 0.01)
    return np.exp(-0.5 * ((grid[:, None] - values[None]) / bw) ** 2).sum(1) / (len(values) * bw * np.sqrt(2 * np.pi))


def run_label(m):
    """How a run is named in the table: its model, plus what sets it apart from the paper's main grid."""
    label = m["model"]
    if m.get("group_size", 2) != 2:
        label += f" (group size {m['group_size']})"
    if m["model"] == "group_tcvae" and m.get("tc_level", "inter") != "inter":
        label += f" (TC {m['tc_level']})"
    return label


def load_runs(runs_dir):
    """Every metrics.json under runs_dir that has the structure evaluate() writes; others are skipped, with a line
    that says why."""
    runs = []
    for path in sorted(Path(runs_dir).rglob("metrics.json")):
        try:
            m = json.loads(path.read_text())
            mi = np.array(m["mi_matrix"], float)
            K = len(m["factor_names"])
            if not (mi.ndim == 2 and mi.shape[1] == K == len(m["factor_entropy"])
                    and math.isfinite(m["mig"]) and math.isfinite(m["group_mig"])
                    and set(m["content_factors"]) <= set(m["factor_names"])
                    and all(0 <= i < len(mi) for i in m["content_latents"])):
                raise ValueError("its MI matrix, factors or scores do not agree")
            for key in ("model", "dataset", "beta", "gamma", "steps"):
                m[key]  # noqa: B018 (present, or KeyError)
            runs.append(m | {"path": str(path.parent)})
        except (OSError, ValueError, KeyError, TypeError) as error:
            print(f"skipping {path}: not a metrics.json of this program ({type(error).__name__}: {error})",
                  file=sys.stderr)
    return runs


def factor_gaps(m):
    """Per factor of a run: its MIG gap and its group-MIG gap, each over H(v_k) (NaN for one-valued factors)."""
    mi, H = np.array(m["mi_matrix"]), np.array(m["factor_entropy"])
    content = [m["factor_names"].index(n) for n in m["content_factors"]]
    H = np.where(H > 0, H, np.nan)
    return mig_gaps(mi) / H, group_gaps(mi, m["content_latents"], content) / H


def split_group_mig(m):
    """group-MIG over the content factors alone and over the non-content factors alone (Figure 3b)."""
    per_factor = factor_gaps(m)[1]
    is_content = np.isin(m["factor_names"], m["content_factors"])
    return float(np.nanmean(per_factor[is_content])), float(np.nanmean(per_factor[~is_content]))


def summarize(runs_dir):
    """Figures 4, 3(b), 3(c) per data set and results.md, from every metrics.json under runs_dir."""
    plt = _plt()
    runs_dir = Path(runs_dir)
    runs = load_runs(runs_dir)
    if not runs:
        raise UserError(f"--summarize: no metrics.json under {runs_dir}; point it at a folder of finished runs")
    lines = [f"# Results: {len(runs)} runs under {runs_dir}", "",
             "MIG and group-MIG: disentanglement_lib's discrete estimator (20 bins, encoder means).", ""]
    colors = {"group_tcvae": "tab:red", "mlvae": "tab:blue", "gvae": "tab:green"}
    for dataset in sorted({m["dataset"] for m in runs}):
        rs = [m for m in runs if m["dataset"] == dataset]
        lines += [f"## {dataset}", "", "| model | runs | steps | MIG mean | MIG median | MIG best | "
                  "group-MIG mean | group-MIG median | group-MIG best |", "|---|---|---|---|---|---|---|---|---|"]
        labels = sorted({run_label(m) for m in rs}, key=lambda s: (s.split()[0] != "group_tcvae", s))
        for label in labels:
            group = [m for m in rs if run_label(m) == label]
            a, b = np.array([m["mig"] for m in group]), np.array([m["group_mig"] for m in group])
            steps = sorted({m["steps"] for m in group})
            lines.append(f"| {label} | {len(group)} | {', '.join(f'{s:,}' for s in steps)} | {a.mean():.3f} | "
                         f"{np.median(a):.3f} | {a.max():.3f} | {b.mean():.3f} | {np.median(b):.3f} | {b.max():.3f} |")
        lines += ["", "Per setting (mean over seeds; then each seed's score, in seed order):", "",
                  "| model | beta | gamma | runs | MIG mean | group-MIG mean | MIG per seed | group-MIG per seed |",
                  "|---|---|---|---|---|---|---|---|"]
        settings = sorted({(run_label(m), m["beta"], m["gamma"]) for m in rs},
                          key=lambda s: (s[0].split()[0] != "group_tcvae", s))
        by_setting = {key: sorted([m for m in rs if (run_label(m), m["beta"], m["gamma"]) == key],
                                  key=lambda m: m.get("seed", 0)) for key in settings}
        for (label, beta, gamma), group in by_setting.items():
            seeds = lambda k: ", ".join(f"{m[k]:.3f}" for m in group)
            lines.append(f"| {label} | {beta:g} | {gamma:g} | {len(group)} | "
                         f"{np.mean([m['mig'] for m in group]):.3f} | {np.mean([m['group_mig'] for m in group]):.3f} | "
                         f"{seeds('mig')} | {seeds('group_mig')} |")
        names = rs[0]["factor_names"]
        content = set(rs[0]["content_factors"])
        for j, what in enumerate(("MIG gap", "group-MIG gap")):
            lines += ["", f"Per factor: {what} over H(v), mean over seeds (c: content factor, \\c: the others). "
                      + ("The gap between the two latents that know the factor best; MIG is the mean of this row."
                         if j == 0 else "Best latent of the factor's own group minus the best of the other group; "
                         "group-MIG is the mean of this row."), "",
                      "| model | beta | gamma | " + " | ".join(("c: " if n in content else "\\c: ") + n
                                                         for n in names) + " |",
                      "|---|---|---|" + "---|" * len(names)]
            for (label, beta, gamma), group in by_setting.items():
                gaps = np.nanmean([factor_gaps(m)[j] for m in group], axis=0)
                lines.append(f"| {label} | {beta:g} | {gamma:g} | " + " | ".join(f"{g:.3f}" for g in gaps) + " |")
        lines.append("")
        main_runs = [m for m in rs if run_label(m) == m["model"]]  # the paper's grid: pairs, TC inter
        # Figure 4: density of MIG and group-MIG per model (points alone for a model with fewer than 3 runs).
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        left_out = len(rs) - len(main_runs)
        for ax, key, title in zip(axes, ("group_mig", "mig"), ("group-MIG", "MIG")):
            values = [m[key] for m in main_runs]
            lo, hi = min(values + [0.0]) - 0.05, max(values + [0.0]) + 0.05
            grid = np.linspace(lo, hi, 300)
            for model in MODELS:
                v = [m[key] for m in main_runs if m["model"] == model]
                if len(v) >= 3:
                    ax.plot(grid, _density(v, grid), color=colors[model], label=f"{model} (n={len(v)})")
                    ax.fill_between(grid, _density(v, grid), color=colors[model], alpha=0.15)
                    ax.plot(v, np.zeros(len(v)), "|", color=colors[model], ms=12)
                elif v:
                    ax.plot(v, np.zeros(len(v)), "o", color=colors[model], ms=6, label=f"{model} (n={len(v)}, points)")
            ax.set_title(f"{title}, {len(main_runs)} runs of the paper's grid ({dataset})\n(pairs, TC inter; every "
                         f"beta and gamma" + (f"; {left_out} other runs not shown)" if left_out else ")"), fontsize=9)
            ax.set_xlabel(f"{title} (higher is better)")
            _legend(ax)
        fig.tight_layout()
        save_figure(fig, runs_dir / f"figure4_{dataset}.png", 110)
        # Figure 3(b): group-MIG of the content and non-content factors, baselines' runs.
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        positions, ticks = 0, []
        for model in ("mlvae", "gvae"):
            parts = [split_group_mig(m) for m in main_runs if m["model"] == model]
            for j, name in enumerate(("content", "non-content")):
                v = [p[j] for p in parts]
                if v:
                    ax.boxplot([v], positions=[positions], widths=0.6)
                    ax.plot(np.full(len(v), positions) + np.linspace(-0.15, 0.15, len(v)), v, "o",
                            color=colors[model], alpha=0.7, ms=4)
                ticks.append((positions, f"{model}\n{name}"))
                positions += 1
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks([t[0] for t in ticks], [t[1] for t in ticks], fontsize=8)
        ax.set_ylabel("group-MIG")
        betas = sorted({m["beta"] for m in main_runs if m["model"] != "group_tcvae"})
        ax.set_title(f"Figure 3(b), {dataset}: group-MIG of content vs non-content\n(MLVAE, GVAE runs of pairs at "
                     f"beta {', '.join(f'{b:g}' for b in betas)})", fontsize=9)
        fig.tight_layout()
        save_figure(fig, runs_dir / f"figure3b_{dataset}.png", 110)
        # Figure 3(c): MIG against the number of observations sharing a group.
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        # The runs at larger groups use the baselines' first beta; pairs are compared at the same beta(s).
        betas = sorted({m["beta"] for m in rs if m["model"] != "group_tcvae" and m.get("group_size", 2) != 2}) or \
            sorted({m["beta"] for m in rs if m["model"] != "group_tcvae"})
        for model in ("mlvae", "gvae"):
            by_size = {}
            for m in rs:
                if m["model"] == model and m["beta"] in betas:
                    by_size.setdefault(m.get("group_size", 2), []).append(m["mig"])
            if by_size:
                sizes = sorted(by_size)
                for s in sizes:
                    ax.plot(np.full(len(by_size[s]), s), by_size[s], "o", color=colors[model], alpha=0.4, ms=4)
                ax.errorbar(sizes, [np.mean(by_size[s]) for s in sizes], [np.std(by_size[s]) for s in sizes],
                            color=colors[model], marker="s", capsize=3, label=model)
        ax.set_xlabel("observations per group (--group-size)")
        ax.set_ylabel("MIG")
        ax.set_title(f"Figure 3(c), {dataset}: MIG vs group size\n(MLVAE, GVAE runs at beta "
                     f"{', '.join(f'{b:g}' for b in betas)})", fontsize=9)
        _legend(ax)
        fig.tight_layout()
        save_figure(fig, runs_dir / f"figure3c_{dataset}.png", 110)
    write_text_atomic(runs_dir / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote results.md and figures to {runs_dir}", file=sys.stderr)
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------
def main(argv=None):
    """Train, evaluate and plot one run (or --eval-only / --summarize). Returns the exit status."""
    try:
        args = parse_args(argv)
        if args.summarize is not None:
            summarize(args.summarize)
            return 0
        finish_args(args)
        if args.eval_only and not (Path(args.out) / "checkpoint.pt").is_file():
            raise UserError(f"--eval-only: no checkpoint.pt in {args.out}; give --out the folder of a trained run")
        try:
            if args.sweep:
                return train_sweep(args)
            with RunFolderLock(args.out):  # one process writes a run folder at a time
                if args.eval_only:
                    eval_only(args)
                    return 0
                trained = train([args])
                if trained is not None:
                    evaluate_and_plot(trained[0].view(0), args.out, args.eval_samples)
            return 0
        except KeyboardInterrupt:
            print(f"\ninterrupted; the files in {args.out} are whole (each is written at once or not at all). "
                  f"Continue with --resume --out {args.out}, or evaluate with --eval-only --out {args.out}",
                  file=sys.stderr)
            return 130
        except OSError as error:  # a write that write_atomic does not cover (log.csv's rows), a read error
            raise UserError(f"{error.filename or args.out}: {error.strerror or error}"
                            f"{_disk_note(error.filename or args.out)}") from None
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
