"""Hostile input and full disks in the pipelines: CIFAR files that would hand back object arrays,
store attrs that name a model the store does not hold, checkpoints that meet a full disk."""

from __future__ import annotations

import copy
import errno
import io
import json
import pickle
import re
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ShapesModel, write_cifar10
from pipelines import atomic, digits
from pipelines import experiment as exp
from pipelines.data import SafeUnpickler, load
from pipelines.models import build_model
from trajstore import TrajectoryStore
from trajstore.cli import main
from trajstore.errors import InvalidStoreError, LayoutMismatchError

# ------------------------------------------------------------------ pickle payloads, opcode by opcode


def _str(text: str) -> bytes:
    raw = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def _py2str(raw: bytes) -> bytes:
    """A Python 2 ``str`` (BINSTRING), as the real CIFAR files hold their pixels."""
    return pickle.BINSTRING + struct.pack("<i", len(raw)) + raw


def _int(value: int) -> bytes:
    return pickle.BININT + struct.pack("<i", value)


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _tuple(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def _call(func: bytes, *args: bytes) -> bytes:
    return func + _tuple(*args) + pickle.REDUCE


def _dtype(code: str, state: bytes | None = None) -> bytes:
    """``numpy.dtype(code, False, True)``, then BUILD with ``state`` (numpy's default when None)."""
    plain = _tuple(_int(3), _str("|"), pickle.NONE, pickle.NONE, pickle.NONE, _int(-1), _int(-1), _int(0))
    return _call(_global("numpy", "dtype"), _str(code), pickle.NEWFALSE, pickle.NEWTRUE) + (state or plain) + pickle.BUILD


def _array(dtype: bytes, shape: tuple[int, ...], raw: bytes, placeholder: str = "b") -> bytes:
    """An ndarray as numpy's protocol 2 pickles write it: an empty placeholder, then BUILD."""
    return (_call(_global("numpy.core.multiarray", "_reconstruct"), _global("numpy", "ndarray"), _tuple(_int(0)),
                  _str(placeholder))
            + _tuple(_int(1), _tuple(*(_int(k) for k in shape)), dtype, pickle.NEWFALSE, raw) + pickle.BUILD)


def _batch(data: bytes, n: int = 2) -> bytes:
    """A CIFAR batch dict {'data': DATA, 'labels': [0] * n}, protocol 2."""
    labels = pickle.EMPTY_LIST + pickle.MARK + _int(0) * n + pickle.APPENDS
    return (pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + _str("data") + data + pickle.SETITEM
            + _str("labels") + labels + pickle.SETITEM + pickle.STOP)


def _fields_state(field_dtype: bytes, flags: int = 63) -> bytes:
    """A dtype state with one field 'a' of ``field_dtype`` at offset 0 (what an object field looks like)."""
    fields = pickle.EMPTY_DICT + _str("a") + _tuple(field_dtype, _int(0)) + pickle.SETITEM
    return _tuple(_int(3), _str("|"), pickle.NONE, _tuple(_str("a")), fields, _int(8), _int(8), _int(flags))


def _real(obj: Any, protocol: int = 2) -> bytes:
    return pickle.dumps({"data": obj, "labels": [0, 0]}, protocol=protocol)


_OBJECTS = np.array([1, "a", None], dtype=object)
_STRUCTURED = np.zeros(2, dtype=[("a", "O"), ("b", "i4")])
U1 = _dtype("u1")

# Each payload would give back an object array (or a dtype with objects) if loaded blindly;
# the message is what the loader's refusal says (after the file's path), literally.
PAYLOADS = {
    # real pickles of real objects
    "object array, protocol 2": (_real(_OBJECTS), "refusing an array of dtype object"),
    "object array, protocol 5": (_real(_OBJECTS, 5), "refusing an array of dtype object"),
    "structured array with an 'O' field": (_real(_STRUCTURED), "refusing an array of dtype |V"),
    "structured array with an 'O' field, protocol 5": (_real(_STRUCTURED, 5), "refusing an array of dtype |V"),
    "np.dtype([('a', 'O')])": (_real(np.dtype([("a", "O")])), "refusing an array of dtype |V8"),
    "np.dtype(('O', (2,)))": (_real(np.dtype(("O", (2,)))), "refusing an array of dtype |V16"),
    "a dtype nested in a dtype": (_real(np.dtype([("outer", [("inner", "O")])])), "refusing an array of dtype |V8"),
    "a subarray dtype of ints": (_real(np.dtype(("i4", (3,)))), "refusing an array of dtype |V12"),
    # crafted streams: every constructing opcode with an object dtype
    "V8 dtype set to hold an object field": (
        _batch(_dtype("V8", _fields_state(_dtype("O8")))), "refusing an array of dtype |V8"),
    "u1 dtype set to hold fields": (_batch(_dtype("u1", _fields_state(U1, flags=0))), "refusing dtype state"),
    "u1 dtype given the has-object flag": (
        _batch(_dtype("u1", _tuple(_int(3), _str("|"), pickle.NONE, pickle.NONE, pickle.NONE, _int(-1), _int(-1),
                                   _int(63)))), "refusing dtype state"),
    "u1 dtype set to a subarray of objects": (
        _batch(_dtype("u1", _tuple(_int(3), _str("|"), _tuple(_dtype("O8"), _tuple(_int(2))), pickle.NONE,
                                   pickle.NONE, _int(16), _int(8), _int(63)))), "refusing an array of dtype object"),
    "dtype from a list of fields (REDUCE)": (
        _batch(_call(_global("numpy", "dtype"), pickle.EMPTY_LIST + pickle.MARK + _tuple(_str("a"), _str("O"))
                     + pickle.APPENDS)), "refusing a dtype built from a list"),
    "dtype from a subarray tuple (REDUCE)": (
        _batch(_call(_global("numpy", "dtype"), _tuple(_str("O"), _tuple(_int(2))))), "refusing a dtype built from a tuple"),
    "_reconstruct with an object placeholder": (
        _batch(_call(_global("numpy.core.multiarray", "_reconstruct"), _global("numpy", "ndarray"), _tuple(_int(0)),
                     _str("O"))), "refusing an array of dtype object"),
    "_reconstruct of a filled object array": (
        _batch(_call(_global("numpy._core.multiarray", "_reconstruct"), _global("numpy", "ndarray"), _tuple(_int(3)),
                     _str("O"))), "refusing an array placeholder"),
    "ndarray(shape, 'O') called (REDUCE)": (
        _batch(_call(_global("numpy", "ndarray"), _tuple(_int(2)), _str("O"))), "refusing a call of"),
    "ndarray.__new__(ndarray, shape, 'O') (NEWOBJ)": (
        _batch(_global("numpy", "ndarray") + _tuple(_tuple(_int(2)), _str("O")) + pickle.NEWOBJ),
        "refusing the pickle opcodes NEWOBJ"),
    "array BUILD with an object list": (
        _batch(_array(U1, (2,), pickle.EMPTY_LIST + pickle.MARK + _int(1) + _int(2) + pickle.APPENDS)),
        "refusing array state"),
    "array BUILD with an object dtype": (_batch(_array(_dtype("O8"), (2,), _py2str(b"\0" * 16))),
                                         "refusing an array of dtype object"),
    "_frombuffer of a V8 dtype": (
        _batch(_call(_global("numpy._core.numeric", "_frombuffer"), pickle.SHORT_BINBYTES + b"\x08" + b"\0" * 8,
                     _dtype("V8"), _tuple(_int(1)), _str("C"))), "refusing an array of dtype |V8"),
    # a dtype used by an array, then given object fields: the array would change under our feet
    "a dtype BUILT again after an array uses it": (
        _batch(_dtype("u1") + pickle.BINPUT + b"\x01" + pickle.POP
               + _call(_global("numpy._core.numeric", "_frombuffer"), pickle.SHORT_BINBYTES + b"\x02\0\0",
                       pickle.BINGET + b"\x01", _tuple(_int(2)), _str("C"))
               + pickle.BINGET + b"\x01" + _fields_state(_dtype("O8")) + pickle.BUILD + pickle.POP),
        "refusing an array of dtype object"),
    "an array BUILT twice": (
        _batch(_array(U1, (2,), _py2str(b"\0\0")) + _tuple(_int(1), _tuple(_int(1)), U1, pickle.NEWFALSE,
                                                           _py2str(b"\0")) + pickle.BUILD),
        "refusing setting the state of a ndarray"),
}


@pytest.mark.parametrize("payload, message", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_cifar_files_that_would_give_object_arrays_are_refused(tmp_path: Path, payload: bytes, message: str) -> None:
    # the unpickler itself: it raises, so no object array is ever handed back
    with pytest.raises(pickle.UnpicklingError, match=re.escape(message)):
        SafeUnpickler(io.BytesIO(payload), encoding="latin1").load()
    # the loader, the file planted among genuine ones: the same refusal, naming the file
    write_cifar10(tmp_path)
    planted = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    planted.write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError, match=f"{re.escape(str(planted))}: .*{re.escape(message)}"):
        load("cifar10", root=str(tmp_path))


def test_the_crafted_payloads_are_what_they_claim() -> None:
    # The stock unpickler does build object arrays from them: the refusals above are not vacuous.
    loaded = pickle.loads(PAYLOADS["V8 dtype set to hold an object field"][0])["data"]
    assert isinstance(loaded, np.dtype) and loaded.hasobject
    loaded = pickle.loads(PAYLOADS["_reconstruct with an object placeholder"][0])["data"]
    assert isinstance(loaded, np.ndarray) and loaded.dtype.hasobject
    loaded = pickle.loads(PAYLOADS["ndarray.__new__(ndarray, shape, 'O') (NEWOBJ)"][0])["data"]
    assert isinstance(loaded, np.ndarray) and loaded.dtype.hasobject


def test_genuine_cifar_batches_still_load(tmp_path: Path) -> None:
    # protocols 2 and 5 (write_cifar10) and the default one
    test_images = write_cifar10(tmp_path)
    data = load("cifar10", root=str(tmp_path), augment=False)
    assert len(data.train) == 20 and np.array_equal(data.test.data, test_images)
    # a Python 2 batch, as the real files are: pixels in a BINSTRING, numpy.core spelled the old way
    pixels = np.arange(2 * 3072, dtype=np.uint8)
    py2 = _batch(_array(_dtype("u1"), (2, 3072), _py2str(pixels.tobytes())))
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(py2)
    data = load("cifar10", root=str(tmp_path), augment=False)
    assert np.array_equal(data.test.data, pixels.reshape(2, 3, 32, 32).transpose(0, 2, 3, 1))


@pytest.mark.parametrize("protocol", range(6))
def test_plain_numeric_arrays_round_trip_through_the_unpickler(protocol: int) -> None:
    arrays = [np.arange(6, dtype=np.uint8).reshape(2, 3), np.arange(6, dtype=">f4").reshape(2, 3).T,
              np.zeros((0, 3)), np.array(True), np.arange(4, dtype=np.complex64)]
    doc = {"arrays": arrays, "same": [arrays[0], arrays[0]], "bytes": b"ab", "empty": b"", "n": None}
    stream = pickle.dumps(doc, protocol=protocol)
    mine, stock = SafeUnpickler(io.BytesIO(stream), encoding="latin1").load(), pickle.loads(stream)
    for a, b in zip(mine["arrays"], stock["arrays"]):
        assert a.dtype == b.dtype and a.shape == b.shape and a.strides == b.strides and np.array_equal(a, b)
    assert mine["same"][0] is mine["same"][1]  # the memo is honoured
    assert (mine["bytes"], mine["empty"], mine["n"]) == (b"ab", b"", None)


def test_a_truncated_file_is_an_unpickling_error(tmp_path: Path) -> None:
    stream = _real(np.zeros((2, 3072), dtype=np.uint8))
    with pytest.raises(pickle.UnpicklingError, match="malformed data file"):
        SafeUnpickler(io.BytesIO(stream[: len(stream) // 2]), encoding="latin1").load()


# ------------------------------------------------------------------ trajstore train: the store's config


def _store(tmp_path: Path, experiment: Any, model: nn.Module | None = None, **attrs: Any) -> Path:
    """A store as 'trajstore sample' leaves it for digits' MLP, with ``experiment`` as its recorded config."""
    path = tmp_path / "trajectory.zarr"
    torch.manual_seed(0)
    model = model or build_model("mlp", 10, (64,))
    with TrajectoryStore.create(path, model, attrs={"experiment": experiment, "seed": 0, **attrs}) as store:
        store.append(model, step=0, epoch=0, lr=0.1)
    return path


def _recorded(**changes: Any) -> dict[str, Any]:
    return {**json.loads(json.dumps(digits.Config().to_json())), **changes}


@pytest.fixture
def nothing_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if train gets as far as a basis, a data set or a model on a real device."""
    def reached(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("train went past the config check")

    # the modules themselves (trajstore.dldr is also the name of the function the package exports)
    monkeypatch.setattr(sys.modules["trajstore.dldr"], "dldr", reached)
    monkeypatch.setattr(sys.modules["trajstore.basis"], "open_basis", reached)
    monkeypatch.setattr(exp, "train_subspace", reached)
    monkeypatch.setattr(exp, "_Setup", reached)


HOSTILE_CONFIGS = [
    # (changes to digits' recorded config, error class, message)
    ({"model": "wrn-1000-40"}, LayoutMismatchError,
     r"model 'wrn-1000-40' for 'digits' has 25,668,\d{3},\d{3} parameters but the store's layout has n = 26,634"),
    ({"model": "resnet20"}, LayoutMismatchError, "model 'resnet20' for 'digits' has 269,722 parameters"),
    ({"model": "wrn-100000-40"}, InvalidStoreError, r"model = 'wrn-100000-40': .*100000 is outside \[4, 1000\]"),
    ({"model": "vgg"}, InvalidStoreError, "model = 'vgg': unknown model 'vgg'"),
    ({"model": "torchvision:nonexistent"}, InvalidStoreError, "model = 'torchvision:nonexistent': unknown torchvision"),
    ({"model": 42}, InvalidStoreError, "model = 42: expected str, got int"),
    ({"data": "imagenet"}, InvalidStoreError, "data = 'imagenet': expected mnist1d, digits"),
    ({"epochs": "40"}, InvalidStoreError, "epochs = '40': expected int, got str"),
    ({"batch_size": True}, InvalidStoreError, "batch_size = True: expected int, got bool"),
    ({"batch_size": 10**12}, InvalidStoreError, r"batch_size = 1000000000000: expected in \[1, 2\*\*24\]"),
    ({"threads": 10**6}, InvalidStoreError, r"threads = 1000000: expected in \[0, 4096\]"),
    ({"lr": -0.1}, InvalidStoreError, r"lr = -0.1: expected in \(0, 1000\]"),
    ({"momentum": 1.5}, InvalidStoreError, r"momentum = 1.5: expected in \[0, 1\)"),
    ({"label_noise": 2}, InvalidStoreError, r"label_noise = 2: expected in \[0, 1\]"),
    ({"milestones": ["a"]}, InvalidStoreError, r"milestones = \['a'\]: expected a list of int"),
    ({"methods": ["rm -rf"]}, InvalidStoreError, "methods = "),
    ({"device": "cuda:99999"}, InvalidStoreError, "device = 'cuda:99999': expected auto, cpu"),
    ({"sample_epochs": 50}, InvalidStoreError, "inconsistent: sample_epochs must be in 1..epochs=40, got 50"),
]


@pytest.mark.parametrize("changes, error, message", HOSTILE_CONFIGS, ids=[str(c) for c, _, _ in HOSTILE_CONFIGS])
def test_train_refuses_a_hostile_config_before_building_anything(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], nothing_built: None, changes: dict[str, Any],
        error: type[Exception], message: str) -> None:
    store = _store(tmp_path, _recorded(**changes))
    # exit code 2 and one line, no traceback
    assert main(["train", str(store), "--dim", "1", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trajstore: error: ") and err.count("\n") == 1 and "Traceback" not in err
    # the documented class, from the functions train calls
    with TrajectoryStore.open(store) as opened:
        attrs, layout = opened.attrs, opened.layout
    with pytest.raises(error, match=message):
        exp.check_store_model(exp.config_from_store(attrs["experiment"]), layout)


def test_train_refuses_a_model_of_the_right_size_but_other_shapes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], nothing_built: None) -> None:
    # one flat parameter as long as digits' MLP: the same n, not the same layout
    store = _store(tmp_path, _recorded(), model=ShapesModel([(26_634,)]))
    assert main(["train", str(store), "--dim", "1"]) == 2
    err = capsys.readouterr().err
    assert "model 'mlp' for 'digits' has the store's 26,634 parameters but other names, shapes or dtypes" in err


@pytest.mark.parametrize("attrs, message", [
    ({"experiment": "digits"}, "experiment config must be a JSON object, got str"),
    ({"seed": "0"}, r"seed = '0' is not an integer in \[0, 2\*\*63\)"),
    ({"seed": -1}, r"seed = -1 is not an integer"),
], ids=["experiment-a-string", "seed-a-string", "seed-negative"])
def test_train_refuses_other_hostile_attrs(tmp_path: Path, capsys: pytest.CaptureFixture[str], nothing_built: None,
                                           attrs: dict[str, Any], message: str) -> None:
    store = _store(tmp_path, **{"experiment": _recorded(), **attrs})
    assert main(["train", str(store), "--dim", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err)


def test_the_recorded_config_of_every_family_passes_the_checks() -> None:
    from pipelines import cifar, mnist1d

    for cfg in (digits.Config(), mnist1d.Config(), cifar.config_for("cifar100-wrn-40-10")):
        recorded = json.loads(json.dumps(cfg.to_json()))  # as the store's attrs hold it
        assert exp.config_from_store(recorded) == exp.load_config(recorded)  # nothing changed by checking


def test_the_store_model_check_accepts_the_store_model(tmp_path: Path) -> None:
    store = _store(tmp_path, _recorded())
    with TrajectoryStore.open(store) as opened:
        exp.check_store_model(exp.config_from_store(opened.attrs["experiment"]), opened.layout)  # no error


# ------------------------------------------------------------------ a full disk under a checkpoint


class _FillingFile:
    """A real file that takes ``room`` bytes, then fails its writes as a full disk does."""

    def __init__(self, f: Any, room: int, *, at_close: bool = False) -> None:
        self._f, self._room, self._at_close = f, room, at_close

    def write(self, data: Any) -> int:
        data = bytes(data)
        if not self._at_close and len(data) > self._room:
            self._f.write(data[: self._room])  # a partial write, then the error
            self._room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def __enter__(self) -> _FillingFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()
        if self._at_close and exc[0] is None:
            raise OSError(errno.ENOSPC, "No space left on device")  # buffered bytes flushed at close


def _full_disk(monkeypatch: pytest.MonkeyPatch, room: int, at_close: bool = False) -> None:
    real = open
    monkeypatch.setattr(atomic, "open", lambda path, mode="r": _FillingFile(real(path, mode), room, at_close=at_close),
                        raising=False)


def _checkpoint() -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    return {"model": model.state_dict(), "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict(),
            "state": {"epoch": 3}}


@pytest.mark.parametrize("room, at_close", [(0, False), (1000, False), (10_000, False), (0, True)],
                         ids=["first-write", "mid-header", "mid-tensor", "at-close"])
def test_a_full_disk_under_a_checkpoint_is_enospc_and_leaves_no_partial_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, room: int, at_close: bool) -> None:
    path = tmp_path / "sgd.ckpt.pt"
    _full_disk(monkeypatch, room, at_close)
    with pytest.raises(OSError, match=f"no space left on device while writing {path}: No space left") as caught:
        exp._save_atomic(_checkpoint(), path)  # what every stage's per-epoch checkpoint goes through
    assert caught.value.errno == errno.ENOSPC and type(caught.value) is OSError  # not torch's RuntimeError
    assert sorted(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pbfgs.ckpt.pt"
    atomic.save_torch({"epoch": 1}, path)
    before = path.read_bytes()
    _full_disk(monkeypatch, 100)
    with pytest.raises(OSError, match="no space left on device"):
        atomic.save_torch(_checkpoint(), path)
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]  # the old one, whole, and no temporary
    assert torch.load(path, weights_only=True) == {"epoch": 1}


def test_other_write_errors_keep_their_errno(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class _Broken(_FillingFile):
        def write(self, data: Any) -> int:
            raise OSError(errno.EIO, "Input/output error")

    real = open
    monkeypatch.setattr(atomic, "open", lambda path, mode="r": _Broken(real(path, mode), 0), raising=False)
    with pytest.raises(OSError, match="Input/output error") as caught:
        atomic.save_torch(_checkpoint(), tmp_path / "m.pt")
    assert caught.value.errno == errno.EIO and sorted(tmp_path.iterdir()) == []


def test_a_full_disk_under_a_json_record_is_enospc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def write_text(self: Path, text: str) -> int:
        with open(self, "w") as f:
            f.write(text[:10])  # a partial file, then the error
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_text)
    path = tmp_path / "sgd.json"
    with pytest.raises(OSError, match=f"no space left on device while writing {path}") as caught:
        exp._save_atomic({"history": []}, path)
    assert caught.value.errno == errno.ENOSPC and sorted(tmp_path.iterdir()) == []


def test_checkpoints_load_back_as_saved(tmp_path: Path) -> None:
    saved = _checkpoint()
    atomic.save_torch(copy.deepcopy(saved), tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    assert loaded["state"] == saved["state"] and torch.equal(loaded["model"]["weight"], saved["model"]["weight"])
