"""bnbook.data: the bundled digits, the IDX/MNIST loader and the mini-batch iterator."""

from __future__ import annotations

import gzip
import socket
import struct

import numpy as np
import pytest
import torch

from bnbook.data import Dataset, load_digits, load_mnist, minibatches, read_idx, standardize


# ---------------------------------------------------------------- digits
def test_digits_shapes_dtypes_and_sizes():
    d = load_digits()
    assert isinstance(d, Dataset)
    assert d.x_train.shape == (1348, 1, 8, 8) and d.x_test.shape == (449, 1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.y_test.shape == (449,)
    assert d.num_classes == 10 and d.image_shape == (1, 8, 8) and d.num_features == 64
    assert set(d.y_train.tolist()) == set(range(10))
    f = d.flat()
    assert f.x_train.shape == (1348, 64) and f.x_test.shape == (449, 64)
    torch.testing.assert_close(f.x_train, d.x_train.flatten(1))
    assert torch.equal(f.y_test, d.y_test)


def test_digits_dtype_and_fraction_options():
    d = load_digits(test_fraction=0.5, dtype=torch.float64)
    assert d.x_train.dtype == torch.float64
    assert len(d.x_test) == round(0.5 * 1797) and len(d.x_train) + len(d.x_test) == 1797


def test_digits_split_deterministic_per_seed_and_different_across_seeds():
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)
    assert a.mean != c.mean  # different training images -> different statistics


def test_digits_standardized_with_training_statistics_only():
    from sklearn.datasets import load_digits as sk_digits

    d = load_digits(dtype=torch.float64)
    raw = sk_digits().images.astype(np.float64)
    # the training split has mean 0 and std 1 (population std) exactly ...
    assert abs(d.x_train.mean().item()) < 1e-12
    assert d.x_train.std(correction=0).item() == pytest.approx(1.0, abs=1e-12)
    # ... the test split does not: it was standardized with the training mean/std
    assert abs(d.x_test.mean().item()) > 1e-4
    # and the stored statistics are those of the training images, not of all images
    train_raw = d.x_train.numpy() * d.std + d.mean
    assert d.mean == pytest.approx(train_raw.mean()) and d.std == pytest.approx(train_raw.std())
    assert d.mean != pytest.approx(raw.mean(), abs=1e-9)
    # undoing the standardization gives back genuine pixel values 0..16
    pixels = d.x_test.numpy() * d.std + d.mean
    np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-9)
    assert pixels.min() == pytest.approx(0) and pixels.max() == pytest.approx(16)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_digits_bad_test_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=fraction)


def test_digits_never_touch_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("load_digits tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert len(load_digits().x_train) == 1348


def test_standardize_rejects_constant_training_data():
    with pytest.raises(ValueError, match="standard deviation"):
        standardize(np.ones((3, 4)), np.zeros((2, 4)))


# ---------------------------------------------------------------- IDX files
def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 0x00 0x00 0x08 ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(path, array: np.ndarray, compress: bool = False):
    raw = _idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def _mnist_folder(folder, rng, n_train=12, n_test=8, size=6, compress=False):
    """A miniature MNIST: random uint8 images, labels cycling through 0..9."""
    data = {
        "train": (rng.integers(0, 256, (n_train, size, size)), np.arange(n_train) % 10),
        "t10k": (rng.integers(0, 256, (n_test, size, size)), (np.arange(n_test) + 3) % 10),
    }
    ext = ".gz" if compress else ""
    for split, (images, labels) in data.items():
        _write(folder / f"{split}-images-idx3-ubyte{ext}", images, compress)
        _write(folder / f"{split}-labels-idx1-ubyte{ext}", labels, compress)
    return data


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_roundtrip(tmp_path, rng, compress):
    images = rng.integers(0, 256, (5, 4, 3)).astype(np.uint8)
    path = _write(tmp_path / ("x.idx" + (".gz" if compress else "")), images, compress)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (5, 4, 3)
    np.testing.assert_array_equal(out, images)


def test_read_idx_big_endian_int32(tmp_path):
    values = np.array([[1, -2], [70000, 3]], dtype=">i4")
    raw = bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 2) + values.tobytes()
    (tmp_path / "v.idx").write_bytes(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "v.idx"), values.astype(np.int64))


def test_read_idx_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.idx"):
        read_idx(tmp_path / "nothere.idx")


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"\x00\x01", "magic"),  # first byte not 0
        (b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"\x00\x01", "magic"),  # unknown type code
        (b"\x00\x00", "magic"),  # shorter than the magic number
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated"),  # dims cut off
        (b"\x00\x00\x08\x00", "truncated"),  # zero dimensions
        (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00\x01", "payload"),  # too short
        (b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x00\x01", "payload"),  # too long
    ],
)
def test_read_idx_corrupt_files(tmp_path, raw, message):
    (tmp_path / "bad.idx").write_bytes(raw)
    with pytest.raises(ValueError, match=message):
        read_idx(tmp_path / "bad.idx")


def test_read_idx_corrupt_gzip(tmp_path):
    (tmp_path / "bad.idx.gz").write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match="gzip"):
        read_idx(tmp_path / "bad.idx.gz")


@pytest.mark.parametrize("compress", [False, True])
def test_load_mnist_official_split(tmp_path, rng, compress):
    raw = _mnist_folder(tmp_path, rng, compress=compress)
    d = load_mnist(tmp_path)
    assert d.x_train.shape == (12, 1, 6, 6) and d.x_test.shape == (8, 1, 6, 6)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    np.testing.assert_array_equal(d.y_train.numpy(), raw["train"][1])
    np.testing.assert_array_equal(d.y_test.numpy(), raw["t10k"][1])
    assert d.num_classes == 10
    # standardized with the training images' statistics only
    train_pixels = raw["train"][0].astype(np.float64)
    assert d.mean == pytest.approx(train_pixels.mean()) and d.std == pytest.approx(
        train_pixels.std()
    )
    expected_test = (raw["t10k"][0] - train_pixels.mean()) / train_pixels.std()
    np.testing.assert_allclose(d.x_test[:, 0].numpy(), expected_test, rtol=1e-5, atol=1e-5)


def test_load_mnist_pooled_split(tmp_path, rng):
    raw = _mnist_folder(tmp_path, rng)
    d = load_mnist(tmp_path, test_fraction=0.25, seed=3)
    assert len(d.x_train) == 15 and len(d.x_test) == 5
    pooled = np.concatenate([raw["train"][1], raw["t10k"][1]])
    got = np.concatenate([d.y_train.numpy(), d.y_test.numpy()])
    np.testing.assert_array_equal(np.sort(got), np.sort(pooled))
    again = load_mnist(tmp_path, test_fraction=0.25, seed=3)
    assert torch.equal(d.x_test, again.x_test)
    assert abs(d.x_train.mean().item()) < 1e-5


def test_load_mnist_accepts_dotted_names(tmp_path, rng):
    _mnist_folder(tmp_path, rng)
    for path in tmp_path.iterdir():
        path.rename(tmp_path / path.name.replace("-idx", ".idx"))
    assert load_mnist(tmp_path).x_train.shape == (12, 1, 6, 6)


def test_load_mnist_missing_folder_and_file(tmp_path, rng):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_mnist(tmp_path / "nowhere")
    _mnist_folder(tmp_path, rng)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path)


def test_load_mnist_count_mismatch(tmp_path, rng):
    _mnist_folder(tmp_path, rng)
    _write(tmp_path / "train-labels-idx1-ubyte", np.arange(11) % 10)
    with pytest.raises(ValueError, match="do not match"):
        load_mnist(tmp_path)


def test_load_mnist_corrupt_file(tmp_path, rng):
    _mnist_folder(tmp_path, rng)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])  # truncated payload
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path)


# ---------------------------------------------------------------- minibatches
def _epoch(n=23, batch=5, seed=0, **kwargs):
    x = torch.arange(n, dtype=torch.float32)[:, None]
    y = torch.arange(n)
    return list(minibatches(x, y, batch, torch.Generator().manual_seed(seed), **kwargs))


def test_minibatches_drop_last_and_cover_each_example_once():
    kept = _epoch()
    assert [len(xb) for xb, _ in kept] == [5, 5, 5, 5]
    seen = torch.cat([yb for _, yb in kept])
    assert len(set(seen.tolist())) == 20  # no repeats within an epoch
    for xb, yb in kept:
        assert torch.equal(xb[:, 0].long(), yb)  # rows stay paired with their labels
    full = _epoch(drop_last=False)
    assert [len(xb) for xb, _ in full] == [5, 5, 5, 5, 3]
    assert sorted(torch.cat([yb for _, yb in full]).tolist()) == list(range(23))


def test_minibatches_order_is_seeded():
    same = [torch.equal(a[1], b[1]) for a, b in zip(_epoch(seed=4), _epoch(seed=4), strict=True)]
    assert all(same)
    other = [torch.equal(a[1], b[1]) for a, b in zip(_epoch(seed=4), _epoch(seed=5), strict=True)]
    assert not all(other)


def test_minibatches_argument_errors():
    x, y, g = torch.zeros(4, 2), torch.zeros(4), torch.Generator()
    with pytest.raises(ValueError, match="batch_size"):
        list(minibatches(x, y, 0, g))
    with pytest.raises(ValueError, match="rows"):
        list(minibatches(x, torch.zeros(3), 2, g))
