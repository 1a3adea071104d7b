"""Storage dtypes: how a float32 parameter vector is kept on disk and read back.

``float32`` stores values exactly; ``float16`` and ``bfloat16`` halve the bytes written and read,
at the cost of rounding (relative 2**-11 and 2**-8 respectively, round to nearest even).
numpy has no bfloat16, so bfloat16 values are stored as their raw 16 bits in a ``uint16`` array
and widened on read by a 16-bit shift, which is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["STORAGE_DTYPES", "StorageDtype", "storage_dtype"]


@dataclass(frozen=True)
class StorageDtype:
    """One on-disk representation of float parameters.

    Attributes
    ----------
    name : str
        The user-facing name (``"float32"``, ``"float16"``, ``"bfloat16"``).
    numpy_dtype : numpy.dtype
        The dtype of the Zarr array that holds the values.
    torch_name : str
        The torch dtype the values have while being staged (torch is imported only to stage).
    fill_value : int or float
        The Zarr fill value: a NaN, so a chunk missing from a committed snapshot reads as NaN and is
        detected (appends refuse non-finite values, so a committed NaN is always damage).
    """

    name: str
    numpy_dtype: np.dtype
    torch_name: str
    fill_value: int | float

    @property
    def itemsize(self) -> int:
        return self.numpy_dtype.itemsize

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.torch_name)

    def as_torch(self, staging: np.ndarray) -> torch.Tensor:
        """A torch view of a staging buffer of this dtype (no copy)."""
        import torch

        tensor = torch.from_numpy(staging)
        return tensor.view(self.torch_dtype) if tensor.dtype != self.torch_dtype else tensor

    def decode(self, stored: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Stored values as float32 (exact widening), into ``out`` when given."""
        if out is None:
            out = np.empty(stored.shape, dtype=np.float32)
        if self.name == "bfloat16":
            widened = out.view(np.uint32)
            np.left_shift(stored, 16, out=widened, dtype=np.uint32, casting="unsafe")
        else:
            out[...] = stored
        return out


STORAGE_DTYPES: dict[str, StorageDtype] = {
    "float32": StorageDtype("float32", np.dtype(np.float32), "float32", float("nan")),
    "float16": StorageDtype("float16", np.dtype(np.float16), "float16", float("nan")),
    # 0x7FC0 is the canonical bfloat16 quiet NaN.
    "bfloat16": StorageDtype("bfloat16", np.dtype(np.uint16), "bfloat16", 0x7FC0),
}


def storage_dtype(name: Any) -> StorageDtype:
    """Look up a storage dtype by name (or torch dtype), with an error that lists the allowed names."""
    if type(name).__name__ == "dtype" and str(name).startswith("torch."):
        name = str(name).removeprefix("torch.")
    if not isinstance(name, str) or name not in STORAGE_DTYPES:
        raise ValueError(
            f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {name!r}"
        )
    return STORAGE_DTYPES[name]
