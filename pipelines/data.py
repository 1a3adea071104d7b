"""Data sets of the experiments, all from local sources (no downloads at run time).

- ``mnist1d``: MNIST-1D (Greydanus 2020) generated on the spot by the ``mnist1d`` package's
  ``make_dataset`` with its default arguments (4,000 train / 1,000 test sequences of 40 values);
- ``digits``: scikit-learn's 8 x 8 digits (shipped with the package), a fixed 80/20 split;
- ``cifar10`` / ``cifar100``: the python version of the data set in a local folder, read with an
  unpickler that only rebuilds numpy arrays (torchvision's loaders call ``pickle.load``, which a
  file from elsewhere could use to run code), with torchvision's transforms for the paper's
  augmentation (4-pixel pad + random crop, horizontal flip) and the per-channel statistics of
  each training set;
- ``imagefolder:PATH``: any torchvision ``ImageFolder`` with ``PATH/train`` and ``PATH/test``.

Optional label noise (:func:`label_noise`) replaces the labels of a seeded random subset with
labels drawn among the data set's other classes.
"""

from __future__ import annotations

import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ["CIFAR_STATS", "CifarArrays", "Data", "SafeUnpickler", "label_noise", "load"]

# Per-channel mean and standard deviation of the training images (pixel values in [0, 1]).
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_CIFAR_LAYOUT = {
    "cifar10": "ROOT/cifar-10-batches-py/ with data_batch_1 ... data_batch_5, test_batch and batches.meta",
    "cifar100": "ROOT/cifar-100-python/ with train, test and meta",
}


@dataclass(frozen=True)
class Data:
    """A train and a test set, with what a model needs to know about them."""

    train: Dataset[Any]
    test: Dataset[Any]
    num_classes: int
    input_shape: tuple[int, ...]
    noisy: np.ndarray | None = None  # boolean mask of the training labels changed by label noise


def label_noise(labels: np.ndarray, fraction: float, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels with ``round(fraction * N)`` of them, chosen at random (seeded), replaced by a label
    drawn uniformly among the *other* ``num_classes - 1`` classes. Returns (labels, changed mask)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label noise fraction must be in [0, 1], got {fraction!r}")
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {num_classes}")
    labels = np.asarray(labels).copy()
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(labels), size=int(round(fraction * len(labels))), replace=False)
    # An offset in 1..C-1 added modulo C never gives back the true class, and is uniform over the others.
    labels[chosen] = (labels[chosen] + rng.integers(1, num_classes, size=len(chosen))) % num_classes
    changed = np.zeros(len(labels), dtype=bool)
    changed[chosen] = True
    return labels, changed


def _tensor_data(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 num_classes: int, noise: float, seed: int) -> Data:
    mask = None
    if noise:
        y_train, mask = label_noise(y_train, noise, num_classes, seed)
    as_x = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return Data(TensorDataset(as_x(x_train), as_y(y_train)), TensorDataset(as_x(x_test), as_y(y_test)),
                num_classes, tuple(x_train.shape[1:]), mask)


def _mnist1d(noise: float, seed: int) -> Data:
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())  # generated locally from the package's templates
    return _tensor_data(d["x"], d["y"], d["x_test"], d["y_test"], 10, noise, seed)


def _digits(noise: float, seed: int) -> Data:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))  # a fixed split: the data set's identity
    x, y = x[order] / 16.0, y[order]
    cut = int(0.8 * len(y))
    return _tensor_data(x[:cut], y[:cut], x[cut:], y[cut:], 10, noise, seed)


class SafeUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR python batches, which are pickled dicts of numpy arrays, allowing only
    the few globals that rebuild arrays: a file from elsewhere can never run code through us."""

    ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        canonical = module.replace("numpy.core.", "numpy._core.")  # numpy 1.x and 2.x spellings
        if (canonical, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file (only numpy arrays are allowed)")
        if name == "dtype":
            return _plain_dtype
        try:
            return getattr(importlib.import_module(canonical), name)
        except ImportError:  # numpy 1.x has no numpy._core
            return getattr(importlib.import_module(canonical.replace("numpy._core.", "numpy.core.")), name)


def _plain_dtype(*args: Any) -> np.dtype:
    """``numpy.dtype`` for the unpickler, refusing object dtypes: an object array's elements come
    from the pickle stream itself, which is more than a CIFAR batch (uint8 pixels) ever holds."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"refusing an array of dtype {dtype} in a data file (only plain numeric arrays)")
    return dtype


def _read_batch(path: Path, label_key: str, layout: str) -> tuple[np.ndarray, list[int]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: expected {layout} (nothing is downloaded)")
    with open(path, "rb") as f:
        batch = SafeUnpickler(f, encoding="latin1").load()
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR batch (a pickled dict), got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, 3072)")
    if not isinstance(labels, list) or len(labels) != len(data):
        raise ValueError(f"{path}: {label_key!r} must be a list of {len(data)} labels")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), [int(v) for v in labels]


class CifarArrays(Dataset[Any]):
    """CIFAR images held as a (N, 32, 32, 3) uint8 array, transformed on access like torchvision's."""

    def __init__(self, images: np.ndarray, targets: list[int], transform: Any) -> None:
        self.data, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def _cifar(name: str, root: str | None, noise: float, seed: int, augment: bool) -> Data:
    from torchvision import transforms

    if root is None:
        raise FileNotFoundError(f"{name} needs --data-root pointing at {_CIFAR_LAYOUT[name]} (nothing is downloaded)")
    folder = Path(root) / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    if not folder.is_dir():
        raise FileNotFoundError(f"{name} not found under {root!r}: expected {_CIFAR_LAYOUT[name]} "
                                "(the python version of the data set; nothing is downloaded)")
    mean, std = CIFAR_STATS[name]
    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    train_tf = transforms.Compose(([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
                                   if augment else []) + normalize)
    layout = _CIFAR_LAYOUT[name]
    if name == "cifar10":
        parts = [_read_batch(folder / f"data_batch_{i}", "labels", layout) for i in range(1, 6)]
        test_x, test_y = _read_batch(folder / "test_batch", "labels", layout)
    else:
        parts = [_read_batch(folder / "train", "fine_labels", layout)]
        test_x, test_y = _read_batch(folder / "test", "fine_labels", layout)
    train_x = np.concatenate([x for x, _ in parts])
    train_y = [v for _, ys in parts for v in ys]
    classes = 10 if name == "cifar10" else 100
    mask = None
    if noise:
        noisy, mask = label_noise(np.asarray(train_y), noise, classes, seed)
        train_y = noisy.tolist()
    train = CifarArrays(train_x, train_y, train_tf)
    test = CifarArrays(test_x, test_y, transforms.Compose(normalize))
    return Data(train, test, classes, (3, 32, 32), mask)


def _image_folder(path: str, noise: float, seed: int) -> Data:
    from torchvision import datasets, transforms

    root = Path(path)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise FileNotFoundError(f"imagefolder needs {root}/train/CLASS/*.png and {root}/test/CLASS/*.png")
    tf = transforms.ToTensor()
    train, test = datasets.ImageFolder(root / "train", tf), datasets.ImageFolder(root / "test", tf)
    mask = None
    if noise:
        noisy, mask = label_noise(np.asarray(train.targets), noise, len(train.classes), seed)
        train.samples = [(p, int(t)) for (p, _), t in zip(train.samples, noisy)]
        train.targets = noisy.tolist()
    shape = tuple(train[0][0].shape)
    return Data(train, test, len(train.classes), shape, mask)


def load(name: str, *, root: str | None = None, label_noise_fraction: float = 0.0, seed: int = 0,
         augment: bool = True) -> Data:
    """A data set by name: ``mnist1d``, ``digits``, ``cifar10``, ``cifar100`` or ``imagefolder:PATH``."""
    if name == "mnist1d":
        return _mnist1d(label_noise_fraction, seed)
    if name == "digits":
        return _digits(label_noise_fraction, seed)
    if name in ("cifar10", "cifar100"):
        return _cifar(name, root, label_noise_fraction, seed, augment)
    if name.startswith("imagefolder:"):
        return _image_folder(name.split(":", 1)[1], label_noise_fraction, seed)
    raise ValueError(f"unknown data set {name!r}; choose mnist1d, digits, cifar10, cifar100 or imagefolder:PATH")
