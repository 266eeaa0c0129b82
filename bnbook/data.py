"""Data sets for the experiments: bundled digits by default, MNIST files if you have them.

Nothing here downloads anything. The default data set is scikit-learn's
bundled copy of the UCI handwritten digits (1,797 grey-scale images of 8x8
pixels, classes 0-9), which ships inside the scikit-learn wheel. Users who
already have the MNIST IDX files can load them with :func:`load_mnist`.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Dataset", "load_digits", "load_mnist", "read_idx", "minibatches", "standardize"]


@dataclass(frozen=True)
class Dataset:
    """A train/test split as float tensors ``x`` of shape (N, 1, H, W) and int64 labels.

    Attributes
    ----------
    x_train, x_test : torch.Tensor, shape (N, 1, H, W)
        Standardized with the *training* set's mean and standard deviation only,
        so no information from the test set leaks into training.
    y_train, y_test : torch.Tensor of int64, shape (N,)
    num_classes : int
    mean, std : float
        The training-set statistics used to standardize both splits.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: float
    std: float

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one image."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_features(self) -> int:
        """Number of pixels per image, the input size of an MLP on flattened images."""
        return int(np.prod(self.image_shape))

    def flat(self) -> Dataset:
        """The same data with each image flattened to a vector, shape (N, H*W)."""
        return Dataset(
            self.x_train.flatten(1),
            self.y_train,
            self.x_test.flatten(1),
            self.y_test,
            self.num_classes,
            self.mean,
            self.std,
        )


def standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    r"""Z-score both arrays with the training array's scalar mean and std.

    :math:`x' = (x - \mu_{train}) / \sigma_{train}`. A single scalar (rather than
    one per pixel) keeps the images' spatial structure, and avoids dividing by
    zero for border pixels that are blank in every image.
    """
    mean = float(train.mean())
    std = float(train.std())
    if not np.isfinite(std) or std == 0.0:
        raise ValueError("training data has zero or non-finite standard deviation")
    return (train - mean) / std, (test - mean) / std, mean, std


def _split(
    images: np.ndarray,
    labels: np.ndarray,
    test_fraction: float,
    seed: int,
    dtype: torch.dtype,
) -> Dataset:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    n_test = int(round(test_fraction * len(images)))
    test_idx, train_idx = order[:n_test], order[n_test:]
    x_train, x_test, mean, std = standardize(
        images[train_idx].astype(np.float64), images[test_idx].astype(np.float64)
    )
    as_x = lambda a: torch.as_tensor(a[:, None, :, :], dtype=dtype)  # noqa: E731
    as_y = lambda a: torch.as_tensor(a, dtype=torch.int64)  # noqa: E731
    return Dataset(
        as_x(x_train),
        as_y(labels[train_idx]),
        as_x(x_test),
        as_y(labels[test_idx]),
        int(labels.max()) + 1,
        mean,
        std,
    )


def load_digits(test_fraction: float = 0.25, seed: int = 0, dtype=torch.float32) -> Dataset:
    """Scikit-learn's bundled 8x8 handwritten digits, split and standardized.

    Parameters
    ----------
    test_fraction : float
        Share of the 1,797 images held out for testing.
    seed : int
        Seed of the shuffle that defines the split; the same seed always gives
        the same split.
    dtype : torch.dtype

    Returns
    -------
    Dataset
        ``x`` of shape (N, 1, 8, 8); with the defaults 1,348 training and 449
        test images.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    return _split(bunch.images, bunch.target, test_fraction, seed, dtype)


# IDX: the MNIST file format. A 4-byte magic number (two zero bytes, a type
# code, the number of dimensions), then each dimension as a big-endian int32,
# then the data. Only unsigned bytes (type 0x08) occur in MNIST.
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a NumPy array.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the header is not a valid IDX header or the payload has the wrong size.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: not a valid gzip file ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX payload has {len(raw) - header} bytes, header {dims} implies {expected}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no {stem}[.gz] in {folder}")


def load_mnist(
    folder, test_fraction: float | None = None, seed: int = 0, dtype=torch.float32
) -> Dataset:
    """Load MNIST from IDX files you already have (this function never downloads).

    Expects ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally
    ``.gz``) in ``folder``. With ``test_fraction=None`` the official train/test
    split is used; otherwise all images are pooled and split like
    :func:`load_digits`.

    Raises
    ------
    FileNotFoundError
        If the folder or a file is missing.
    ValueError
        If a file is corrupt, or images and labels disagree in count.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"MNIST folder not found: {folder}")
    parts = {}
    for split in ("train", "t10k"):
        images = read_idx(_find(folder, f"{split}-images-idx3-ubyte"))
        labels = read_idx(_find(folder, f"{split}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{split}: images of shape {images.shape} do not match "
                f"labels of shape {labels.shape}"
            )
        parts[split] = (images, labels.astype(np.int64))
    if test_fraction is not None:
        images = np.concatenate([parts["train"][0], parts["t10k"][0]])
        labels = np.concatenate([parts["train"][1], parts["t10k"][1]])
        return _split(images, labels, test_fraction, seed, dtype)
    (xtr, ytr), (xte, yte) = parts["train"], parts["t10k"]
    xtr, xte, mean, std = standardize(xtr.astype(np.float64), xte.astype(np.float64))
    return Dataset(
        torch.as_tensor(xtr[:, None], dtype=dtype),
        torch.as_tensor(ytr),
        torch.as_tensor(xte[:, None], dtype=dtype),
        torch.as_tensor(yte),
        int(max(ytr.max(), yte.max())) + 1,
        mean,
        std,
    )


def minibatches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    drop_last: bool = True,
):
    """Yield one epoch of shuffled ``(x, y)`` mini-batches.

    ``drop_last=True`` (the default) skips a final short batch: a batch of one
    image would make training-mode batch norm fail, and a very small one gives
    noisy statistics.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    order = torch.randperm(len(x), generator=generator)
    stop = len(x) - len(x) % batch_size if drop_last else len(x)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]
