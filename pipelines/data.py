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

import math
import pickle
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ["CIFAR_STATS", "CifarArrays", "Data", "SafeUnpickler", "label_noise", "load", "signature"]

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


# Kinds of the only dtypes a data file may hold: bool, signed and unsigned integers, floats,
# complex. No object ('O'), structured or void ('V'), string, datetime or subarray dtype.
_NUMERIC_KINDS = "biufc"
# The state numpy pickles for every such dtype (``np.dtype('f4').__reduce__()[2]``): a byte
# order, then no subarray, no names, no fields, and itemsize, alignment and flags left to the type.
_DTYPE_STATE_TAIL = (None, None, None, -1, -1, 0)


def _show(value: object) -> str:
    """A short repr of a value from the stream (which may be as large as the file)."""
    if isinstance(value, (str, bytes, bytearray)) and len(value) > 40:
        return f"<{type(value).__name__} of length {len(value)}>"
    return reprlib.repr(value)


def _refuse(what: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"refusing {what} in a data file (only plain numeric arrays are allowed)")


def _numeric(dtype: np.dtype) -> np.dtype:
    """``dtype`` if it is a plain numeric one; an object array's elements would come from the
    pickle stream itself, which is more than a CIFAR batch (uint8 pixels) ever holds."""
    if dtype.hasobject or dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise _refuse(f"an array of dtype {dtype}")
    return dtype


def _is_shape(value: object) -> bool:
    return (isinstance(value, tuple) and len(value) <= 32
            and all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in value))


class _NdarrayClass:
    """What ``numpy.ndarray`` unpickles to: a token for :func:`_placeholder`, never callable, so
    a stream cannot call ``ndarray(shape, dtype)`` (REDUCE) or ``ndarray.__new__`` (NEWOBJ)."""

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayClass()


def _dtype(obj: Any, align: Any = False, copy: Any = True) -> np.dtype:
    """``numpy.dtype`` for the unpickler: from a type code only (a list, dict or tuple would build
    a structured dtype), always a fresh copy (a BUILD must never alter numpy's shared descriptor),
    and numeric."""
    if not isinstance(obj, (str, bytes)):
        raise _refuse(f"a dtype built from a {type(obj).__name__}")
    try:
        dtype = np.dtype(obj, bool(align), True)
    except (TypeError, ValueError) as e:
        raise pickle.UnpicklingError(f"not a dtype in a data file: {_show(obj)}: {e}") from e
    return _numeric(dtype)


def _placeholder(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """``numpy._core.multiarray._reconstruct``: the empty array numpy's pickles fill by BUILD."""
    if subtype is not _NDARRAY or not _is_shape(shape) or shape != (0,) or not isinstance(dtype, (str, bytes)):
        raise _refuse(f"an array placeholder _reconstruct({_show(subtype)}, {_show(shape)}, {_show(dtype)})")
    return np.ndarray((0,), _dtype(dtype))  # what _reconstruct(ndarray, (0,), dtype) does


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any, axis_order: Any = None) -> np.ndarray:
    """``numpy._core.numeric._frombuffer``, numpy's pickle protocol 5 path, with its arguments checked."""
    if not isinstance(buf, (bytes, bytearray)) or not isinstance(dtype, np.dtype) or not _is_shape(shape) \
            or not isinstance(order, str) or order not in ("C", "F", "K") \
            or not (axis_order is None or (_is_shape(axis_order) and sorted(axis_order) == list(range(len(shape))))):
        raise _refuse(f"an array _frombuffer({type(buf).__name__}, {_show(dtype)}, {_show(shape)}, {_show(order)}, "
                      f"{_show(axis_order)})")
    _numeric(dtype)
    if len(buf) != math.prod(shape) * dtype.itemsize:
        raise pickle.UnpicklingError(f"an array of shape {shape} and dtype {dtype} in a data file has {len(buf)} bytes")
    array = np.frombuffer(buf, dtype=dtype)
    if order == "K" and axis_order is not None:
        return array.reshape(shape, order="C").transpose(axis_order)
    return array.reshape(shape, order=order)


def _latin1(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode``: how protocol 2 writes bytes, always as ``(str, 'latin1')``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _refuse(f"_codecs.encode of a {type(text).__name__} to {_show(encoding)}")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()``: how protocols 0 to 2 write an empty bytes object (an empty array's data)."""
    if args:
        raise _refuse(f"bytes() of {len(args)} arguments")
    return b""


class SafeUnpickler(pickle._Unpickler):
    """Unpickles the CIFAR python batches, which are pickled dicts of numpy arrays, allowing only
    what rebuilds plain numeric arrays: a file from elsewhere can neither run code through us nor
    hand back an object array (whose elements, and pointers, would come from the stream).

    The pure-Python unpickler, so that every opcode that constructs something is ours to check:

    - globals: ``numpy.dtype``, ``_reconstruct``, ``_frombuffer``, ``numpy.ndarray`` (only as the
      first argument of ``_reconstruct``), ``_codecs.encode`` and ``bytes()``, each replaced by a function that
      checks its arguments and its result (:func:`_dtype`, :func:`_placeholder`, ...);
    - REDUCE calls only those; NEWOBJ, NEWOBJ_EX, OBJ and INST, which numpy never writes, are refused;
    - BUILD applies only once, only to a dtype or an array placeholder just made by REDUCE, and
      only a state numpy writes for a numeric dtype (byte order only) or array (raw bytes, no
      object list), checked before numpy sees it: an object, structured, void or subarray dtype
      is never constructed, whatever the path (nested dtypes, a dtype's fields set afterwards);
    - the loaded object is walked, and anything but containers, scalars, bytes, strings and
      numeric arrays is refused.

    Every refusal, and any malformed stream, raises :class:`pickle.UnpicklingError`.
    """

    GLOBALS: dict[tuple[str, str], Any] = {
        ("numpy._core.multiarray", "_reconstruct"): _placeholder, ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _dtype, ("_codecs", "encode"): _latin1,
        ("builtins", "bytes"): _empty_bytes, ("__builtin__", "bytes"): _empty_bytes}
    _CALLABLE = (_placeholder, _frombuffer, _dtype, _latin1, _empty_bytes)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unbuilt: dict[int, Any] = {}  # what REDUCE made that BUILD may fill once, by id (kept alive)

    def find_class(self, module: str, name: str) -> Any:
        canonical = module.replace("numpy.core.", "numpy._core.")  # numpy 1.x and 2.x spellings
        if (canonical, name) not in self.GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file (only numpy arrays are allowed)")
        return self.GLOBALS[(canonical, name)]

    def load(self) -> Any:
        try:
            loaded = super().load()
        except pickle.UnpicklingError:
            raise
        except Exception as e:  # a malformed or truncated stream, whatever broke on it
            raise pickle.UnpicklingError(f"malformed data file: {type(e).__name__}: {e}") from e
        _check_loaded(loaded)
        return loaded

    dispatch = dict(pickle._Unpickler.dispatch)

    def _load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if not any(func is f for f in self._CALLABLE) or not isinstance(args, tuple):
            raise _refuse(f"a call of {_show(func)}")
        result = func(*args)
        if isinstance(result, (np.dtype, np.ndarray)) and func is not _frombuffer:
            self._unbuilt[id(result)] = result
        self.stack[-1] = result

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if self._unbuilt.pop(id(inst), None) is not inst:
            raise _refuse(f"setting the state of a {type(inst).__name__} (BUILD) that is not a fresh array or dtype")
        if isinstance(inst, np.dtype):
            # types first: comparing an array from the stream with == would not give a bool
            if not (isinstance(state, tuple) and len(state) == 8 and all(type(v) in (int, str, type(None)) for v in state)
                    and state[0] == 3 and state[1] in ("<", ">", "|", "=") and state[2:] == _DTYPE_STATE_TAIL):
                raise _refuse(f"dtype state {_show(state)} (only a byte order may be set: no fields, subarray, "
                              "flags or sizes)")
            inst.__setstate__(state)
            _numeric(inst)
        else:
            inst.__setstate__(_array_state(state))
            _numeric(inst.dtype)

    def _refuse_opcode(self) -> None:
        raise _refuse("the pickle opcodes NEWOBJ, NEWOBJ_EX, OBJ and INST (numpy arrays never need them)")

    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.BUILD[0]] = _load_build
    for _op in (pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.OBJ, pickle.INST):
        dispatch[_op[0]] = _refuse_opcode
    del _op


def _array_state(state: Any) -> tuple[Any, ...]:
    """An ndarray's pickled state ``(version, shape, dtype, fortran, raw)`` (or without the version,
    as older numpy wrote it), checked: a numeric dtype and raw bytes of the right length (an object
    array's state holds a list of its elements instead)."""
    if isinstance(state, tuple) and len(state) == 4:
        state = (1, *state)
    if not (isinstance(state, tuple) and len(state) == 5):
        raise _refuse(f"array state {_show(state)}")
    version, shape, dtype, fortran, raw = state
    if type(version) is not int or version != 1 or not _is_shape(shape) or not isinstance(dtype, np.dtype) \
            or type(fortran) not in (bool, int) or fortran not in (0, 1) or not isinstance(raw, (bytes, bytearray, str)):
        raise _refuse(f"array state ({_show(version)}, {_show(shape)}, {_show(dtype)}, {_show(fortran)}, "
                      f"{type(raw).__name__})")
    _numeric(dtype)
    if len(raw) != math.prod(shape) * dtype.itemsize:  # a str is latin1: one character per byte
        raise pickle.UnpicklingError(f"an array of shape {shape} and dtype {dtype} in a data file has {len(raw)} bytes")
    return state


_PLAIN = (str, bytes, bytearray, int, float, complex, bool, type(None))


def _check_loaded(obj: Any) -> None:
    """Walk what was loaded (iteratively: a stream may nest deeply or refer to itself) and refuse
    anything but containers, scalars, strings, bytes and numeric arrays."""
    todo, seen = [obj], set()
    while todo:
        item = todo.pop()
        if id(item) in seen or isinstance(item, _PLAIN):
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            todo.extend(item)
        elif type(item) is np.ndarray:
            _numeric(item.dtype)
        elif isinstance(item, np.dtype):
            _numeric(item)
        else:
            raise _refuse(f"a {type(item).__name__}")


def _read_batch(path: Path, label_key: str, layout: str) -> tuple[np.ndarray, list[int]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: expected {layout} (nothing is downloaded)")
    with open(path, "rb") as f:
        try:
            batch = SafeUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{path}: {e}") from e
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


# Classes and input shape of the built-in data sets, known without loading them.
_SIGNATURES = {"mnist1d": (10, (40,)), "digits": (10, (64,)), "cifar10": (10, (3, 32, 32)),
               "cifar100": (100, (3, 32, 32))}


def signature(name: str) -> tuple[int, tuple[int, ...]]:
    """``(num_classes, input_shape)`` of a data set, what sizes a model for it: a table for the
    built-in ones (nothing read), the folders and first image for ``imagefolder:PATH``."""
    if name in _SIGNATURES:
        return _SIGNATURES[name]
    if isinstance(name, str) and name.startswith("imagefolder:"):
        data = _image_folder(name.split(":", 1)[1], 0.0, 0)
        return data.num_classes, data.input_shape
    raise ValueError(f"unknown data set {name!r:.80}; choose mnist1d, digits, cifar10, cifar100 or imagefolder:PATH")


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
