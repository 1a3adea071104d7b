"""The layout of a model: where each named parameter lives in the flat snapshot vector.

A snapshot is the concatenation, in ``model.named_parameters()`` order, of every parameter
flattened in C order: parameter ``k`` occupies ``[offset_k, offset_k + numel_k)`` of a vector of
length ``n``. Persistent buffers (BatchNorm running statistics, counters) are not part of that
vector: they are kept byte for byte beside it, so ``load_into`` restores them exactly whatever
their dtype.

Layouts are written to the store as JSON and read back through :meth:`Layout.from_json`, which
checks every field before anything is allocated from it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import InvalidStoreError, LayoutMismatchError

if TYPE_CHECKING:
    import torch

__all__ = ["BufferSpec", "Layout", "ParamSpec", "MAX_ELEMENTS", "unwrap_model"]


def unwrap_model(model: Any) -> Any:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (their parameters are the
    inner module's, named ``module.*``); any other model as it is."""
    import torch

    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model

# A bound on what a layout read from a store may claim (2**40 float32 values = 4 TiB per
# snapshot), so a hostile store cannot make us allocate from absurd shapes.
MAX_ELEMENTS = 2**40
_FLOAT_DTYPES = {"float32", "float64", "float16", "bfloat16"}
# Bytes per element of the torch dtypes a buffer may have; a table, so reading a layout needs no torch.
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
            "int8": 1, "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8, "bool": 1, "complex64": 8,
            "complex128": 16, "float8_e4m3fn": 1, "float8_e5m2": 1}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _itemsize(name: str) -> int:
    if name not in ITEMSIZE:
        raise InvalidStoreError(f"layout names an unknown torch dtype {name!r} (supported: {sorted(ITEMSIZE)})")
    return ITEMSIZE[name]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its name, shape, dtype and element offset in the flat vector."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int

    @functools.cached_property
    def numel(self) -> int:  # cached: an append of a 50,000-tensor model asks 100,000 times
        return math.prod(self.shape)

    @functools.cached_property
    def stop(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class BufferSpec:
    """One persistent buffer: its name, shape, dtype and byte offset in the buffer record."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)

    @property
    def stop(self) -> int:
        return self.offset + self.nbytes


def _persistent_buffers(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    # named_buffers() also yields non-persistent buffers, which state_dict() leaves out and
    # a user does not expect to be restored.
    persistent = set(model.state_dict(keep_vars=True))
    return [(name, b) for name, b in model.named_buffers() if name in persistent]


@dataclass(frozen=True)
class Layout:
    """Parameters and buffers of a model, in a stable order.

    Attributes
    ----------
    params : tuple of ParamSpec
        In ``model.named_parameters()`` order, contiguous from offset 0.
    buffers : tuple of BufferSpec
        Persistent buffers in ``model.named_buffers()`` order, contiguous byte ranges from 0.
    """

    params: tuple[ParamSpec, ...]
    buffers: tuple[BufferSpec, ...] = ()

    @property
    def n(self) -> int:
        """Length of the flat parameter vector."""
        return self.params[-1].stop if self.params else 0

    @property
    def buffer_nbytes(self) -> int:
        return self.buffers[-1].stop if self.buffers else 0

    @property
    def fingerprint(self) -> str:
        """A hash of names, shapes and dtypes (not offsets, which follow from them)."""
        items = [["p", p.name, list(p.shape), p.dtype] for p in self.params]
        items += [["b", b.name, list(b.shape), b.dtype] for b in self.buffers]
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]

    @classmethod
    def from_model(cls, model: torch.nn.Module, *, allow_meta: bool = False) -> Layout:
        """The layout of ``model``, refusing what a store cannot hold before anything is written.

        Parameters
        ----------
        model : torch.nn.Module
            Its parameters must be dense (``torch.strided``) float16, bfloat16, float32 or float64
            tensors holding values; its persistent buffers dense tensors of a dtype in ``ITEMSIZE``.
        allow_meta : bool
            Accept parameters and buffers on torch's ``meta`` device (shapes without values), for
            a layout that only plans or compares (``trajstore plan``, checking a store's recorded
            model); never for one that records snapshots, which need the values.

        Raises
        ------
        TypeError
            A parameter of another dtype (float8, complex, integer) or a buffer of an unknown one.
        LayoutMismatchError
            A parameter or buffer on the meta device (unless ``allow_meta``) or not strided
            (sparse, mkldnn...); the message names it.
        ValueError
            A model without parameters.
        """
        model = unwrap_model(model)
        params: list[ParamSpec] = []
        offset = 0
        for name, p in model.named_parameters():
            _check_tensor("parameter", name, p, allow_meta)
            if _dtype_name(p.dtype) not in _FLOAT_DTYPES:
                raise TypeError(f"parameter {name!r} has dtype {p.dtype}; only float parameters can be stored "
                                f"({', '.join(sorted(_FLOAT_DTYPES))})")
            params.append(ParamSpec(name, tuple(p.shape), _dtype_name(p.dtype), offset))
            offset += p.numel()
        if not params or offset == 0:
            raise ValueError(f"{type(model).__name__} has no parameters to record")
        buffers: list[BufferSpec] = []
        boffset = 0
        for name, b in _persistent_buffers(model):
            _check_tensor("buffer", name, b, allow_meta)
            if _dtype_name(b.dtype) not in ITEMSIZE:
                raise TypeError(f"buffer {name!r} has dtype {b.dtype}, which a store cannot hold "
                                f"(supported: {', '.join(sorted(ITEMSIZE))})")
            spec = BufferSpec(name, tuple(b.shape), _dtype_name(b.dtype), boffset)
            buffers.append(spec)
            boffset += spec.nbytes
        return cls(tuple(params), tuple(buffers))

    def check_model(self, model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The model's parameters and buffers in layout order, or a LayoutMismatchError.

        The error names the first differing parameter (or buffer) and both shapes. A model in
        ``DistributedDataParallel`` is checked as the module inside.
        """
        model = unwrap_model(model)
        params = list(model.named_parameters())
        buffers = _persistent_buffers(model)
        _compare("parameter", [(s.name, s.shape, s.dtype) for s in self.params], params)
        _compare("buffer", [(s.name, s.shape, s.dtype) for s in self.buffers], buffers)
        return [p for _, p in params], [b for _, b in buffers]

    def check_param_shapes(self, params: Sequence[torch.Tensor]) -> None:
        """Check parameter tensors given in layout order by count and shape only (an optimizer's
        parameters may be of another float dtype than recorded); LayoutMismatchError names the
        first that differs."""
        fix = "pass model.parameters() of the model the trajectory was recorded from, in that order"
        if len(params) != len(self.params):
            raise LayoutMismatchError(f"{len(params)} parameter tensors given; the basis's trajectory has "
                                      f"{len(self.params)}: {fix}")
        for k, (spec, p) in enumerate(zip(self.params, params)):
            if tuple(p.shape) != tuple(spec.shape):
                raise LayoutMismatchError(f"parameter {k} has shape {tuple(p.shape)}; the basis's trajectory has "
                                          f"{spec.name!r} of shape {tuple(spec.shape)} there: {fix}")

    def check_tensors(self, params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor] = ()) -> None:
        """Check tensors given in layout order (no names: they are the layout's) for count,
        shape and, for buffers, dtype; raises LayoutMismatchError naming the first difference."""
        def named(specs: Sequence[Any], tensors: Sequence[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
            return [(specs[i].name if i < len(specs) else f"#{i}", t) for i, t in enumerate(tensors)]

        _compare("parameter", [(s.name, s.shape, s.dtype) for s in self.params], named(self.params, params))
        _compare("buffer", [(s.name, s.shape, s.dtype) for s in self.buffers], named(self.buffers, buffers))

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "fingerprint": self.fingerprint,
            "params": [[p.name, list(p.shape), p.dtype, p.offset] for p in self.params],
            "buffers": [[b.name, list(b.shape), b.dtype, b.offset] for b in self.buffers],
        }

    @classmethod
    def from_json(cls, doc: object) -> Layout:
        """Parse and validate a layout read from a store; raises InvalidStoreError."""
        if not isinstance(doc, Mapping):
            raise InvalidStoreError(f"layout must be a JSON object, got {type(doc).__name__}")
        params = tuple(ParamSpec(*_entry(e, "parameter")) for e in _list(doc.get("params"), "params"))
        buffers = tuple(BufferSpec(*_entry(e, "buffer")) for e in _list(doc.get("buffers", []), "buffers"))
        for spec in params:
            if spec.dtype not in _FLOAT_DTYPES:
                raise InvalidStoreError(f"parameter {spec.name!r} has non-float dtype {spec.dtype!r}")
        for spec in buffers:
            _itemsize(spec.dtype)
        _check_contiguous("parameter", params, lambda s: s.numel)
        _check_contiguous("buffer", buffers, lambda s: s.nbytes)
        layout = cls(params, buffers)
        if not params or layout.n == 0:
            raise InvalidStoreError("layout has no parameters")
        if layout.n > MAX_ELEMENTS or layout.buffer_nbytes > MAX_ELEMENTS:
            raise InvalidStoreError(f"layout claims {layout.n} parameters, more than the limit {MAX_ELEMENTS}")
        n = doc.get("n", layout.n)
        if not _is_int(n) or n != layout.n:
            raise InvalidStoreError(f"layout says n = {doc.get('n')!r} but its parameters add up to {layout.n}")
        if "fingerprint" in doc and doc["fingerprint"] != layout.fingerprint:
            raise InvalidStoreError(
                f"layout fingerprint {doc['fingerprint']!r} does not match its entries ({layout.fingerprint})"
            )
        return layout

    def slices(self) -> Iterator[tuple[ParamSpec, slice]]:
        for spec in self.params:
            yield spec, slice(spec.offset, spec.stop)


def _check_tensor(kind: str, name: str, t: torch.Tensor, allow_meta: bool) -> None:
    import torch

    # A sparse or mkldnn tensor has no flat C-order view to copy into a snapshot, and a meta one
    # no values: refused here, before a store is created, rather than failing in the first append.
    if t.layout != torch.strided:
        raise LayoutMismatchError(f"{kind} {name!r} is a {t.layout} tensor; only dense (torch.strided) "
                                  f"{kind}s can be stored")
    if t.device.type == "meta" and not allow_meta:
        raise LayoutMismatchError(f"{kind} {name!r} is on the meta device (a shape without values); "
                                  "materialize the model (model.to_empty(device=...) and initialize it) first")


def _compare(kind: str, expected: Sequence[tuple[str, tuple[int, ...], str]],
             actual: Sequence[tuple[str, torch.Tensor]]) -> None:
    for i in range(max(len(expected), len(actual))):
        if i >= len(actual):
            name, shape, _ = expected[i]
            raise LayoutMismatchError(f"model lacks {kind} {name!r} of shape {shape} recorded in the store")
        if i >= len(expected):
            name, tensor = actual[i]
            raise LayoutMismatchError(
                f"model has an extra {kind} {name!r} of shape {tuple(tensor.shape)} not in the store's layout"
            )
        (ename, eshape, edtype), (aname, tensor) = expected[i], actual[i]
        if ename != aname or eshape != tuple(tensor.shape):
            raise LayoutMismatchError(
                f"{kind} {i} differs: store has {ename!r} of shape {eshape}, "
                f"model has {aname!r} of shape {tuple(tensor.shape)}"
            )
        if kind == "buffer" and edtype != _dtype_name(tensor.dtype):
            raise LayoutMismatchError(
                f"buffer {ename!r} has dtype {_dtype_name(tensor.dtype)} in the model, {edtype} in the store"
            )


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidStoreError(f"layout field {what!r} must be a list, got {type(value).__name__}")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(entry: object, kind: str) -> tuple[str, tuple[int, ...], str, int]:
    if not (isinstance(entry, list) and len(entry) == 4):
        raise InvalidStoreError(f"{kind} entry must be [name, shape, dtype, offset], got {entry!r:.200}")
    name, shape, dtype, offset = entry
    if not isinstance(name, str) or not isinstance(dtype, str):
        raise InvalidStoreError(f"{kind} entry has a non-string name or dtype: {entry!r:.200}")
    if not isinstance(shape, list) or len(shape) > 32 or not all(_is_int(d) and 0 <= d <= MAX_ELEMENTS for d in shape):
        raise InvalidStoreError(f"{kind} {name!r} has an invalid shape {shape!r:.200}")
    if not _is_int(offset) or not 0 <= offset <= MAX_ELEMENTS:
        raise InvalidStoreError(f"{kind} {name!r} has an invalid offset {offset!r:.200}")
    if math.prod(shape) > MAX_ELEMENTS:
        raise InvalidStoreError(f"{kind} {name!r} has a shape {shape} larger than the limit {MAX_ELEMENTS}")
    return name, tuple(shape), dtype, offset


def _check_contiguous(kind: str, specs: Sequence[Any], size: Any) -> None:
    expected = 0
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise InvalidStoreError(f"{kind} {spec.name!r} appears twice in the layout")
        seen.add(spec.name)
        if spec.offset != expected:
            raise InvalidStoreError(
                f"{kind} {spec.name!r} starts at offset {spec.offset}, expected {expected} "
                "(entries must be contiguous and must not overlap)"
            )
        expected += size(spec)
