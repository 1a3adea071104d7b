"""A store's root and a trajectory's creation: what is written before the first snapshot.

Creation never deletes or overwrites anything it did not write: the root document is written
only into an empty folder (or one holding nothing but temporary files of interrupted writes), a
trajectory's folder is reused only when it holds no more than what a killed creation leaves, and
the trajectory's group document is written last, so a trajectory is visible once it is whole.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from . import _backend, _io
from ._dims import BUFFERS_DIMS, PARAMS_DIMS
from .errors import FormatVersionError, NotAStoreError, StoreExistsError

__all__ = ["FORMAT_VERSION", "GROUP_DOC", "READABLE_VERSIONS", "TRAJ_ROOT", "check_version", "claim_name",
           "create_arrays", "read_root", "root_for_create"]

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
TRAJ_ROOT = "trajectories"
GROUP_DOC = {"zarr_format": 3, "node_type": "group", "attributes": {}}
# What a killed creation can leave in a trajectory's folder (besides temporary files); writer.lock is
# the lease's lock file of earlier versions, and of file systems whose folders cannot be locked.
_CREATION_KEYS = {"zarr.json", "params/zarr.json", "buffers/zarr.json", "writer.json", "writer.lock"}


def _is_temporary(name: str) -> bool:
    """A temporary file of an interrupted write: Zarr's ``KEY.<hex>.partial`` or trajstore's
    ``.KEY.<pid>.<thread>.partial``; nothing else (a user's ``thesis.partial`` is not ours)."""
    return re.fullmatch(r"[^/]+\.[0-9a-f]{6,32}\.partial|\.[^/]+\.\d+\.\d+\.partial", name) is not None


def read_root(store: zarr.abc.store.Store, where: str) -> zarr.Group:
    try:
        root = _backend.open_group(store, "", "r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as e:
        raise NotAStoreError(f"{where} is not a trajstore store (no Zarr v3 group there)") from e
    except NotADirectoryError as e:
        raise NotAStoreError(f"{where} is not a trajstore store (not a folder)") from e
    except (ValueError, KeyError, TypeError) as e:
        raise NotAStoreError(f"{where} is not a trajstore store ({e})") from e
    meta = root.attrs.get("trajstore")
    if not isinstance(meta, dict) or meta.get("kind") != "store":
        raise NotAStoreError(f"{where} is a Zarr group but not a trajstore store (no 'trajstore' attribute)")
    check_version(meta, where)
    return root


def _only_temporary_files(zstore: zarr.abc.store.Store, limit: int = 100) -> bool:
    """Whether the store holds nothing but temporary files of interrupted writes."""

    async def keys() -> list[str]:
        out = []
        async for key in zstore.list():
            out.append(key)
            if len(out) > limit:
                break
        return out

    found = _backend.sync(keys())
    return 0 < len(found) <= limit and all(_is_temporary(k.rsplit("/", 1)[-1]) for k in found)


def check_version(meta: Mapping[str, Any], where: str) -> int:
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise FormatVersionError(
            f"{where} was written with trajstore format version {version!r:.40}; "
            f"this trajstore reads versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    return int(version)


def root_for_create(zstore: zarr.abc.store.Store, where: str) -> None:
    """Make sure ``zstore`` is a trajstore store, writing its root document if it is empty. Never
    deletes or overwrites anything: a store holding other data is refused."""
    try:
        read_root(zstore, where)  # validates kind and format version
        present = True
    except NotAStoreError:
        present = False
    if not present:
        try:
            empty = _backend.sync(zstore.is_empty(""))
        except (FileNotFoundError, NotADirectoryError):
            empty = True
        if not empty and not _only_temporary_files(zstore):
            raise StoreExistsError(f"{where} exists and holds data that is not a trajstore store; "
                                   "refusing to write there")
        meta = {"format_version": FORMAT_VERSION, "kind": "store", "created": time.time()}
        # Two processes creating the store at once both write a valid root: the last one stays.
        _io.write_json_atomic(zstore, "zarr.json", {**GROUP_DOC, "attributes": {"trajstore": meta}},
                              durable=False)
    if not _backend.sync(zstore.exists(f"{TRAJ_ROOT}/zarr.json")):
        _io.write_json_atomic(zstore, f"{TRAJ_ROOT}/zarr.json", GROUP_DOC, durable=False)


def claim_name(zstore: zarr.abc.store.Store, where: str, prefix: str, name: str) -> None:
    """Refuse a name in use; a folder left by a killed creation (only the keys a creation writes,
    no group document with a trajectory in it) is ours to overwrite, anything else is not."""
    doc = None
    try:
        doc = _backend.read_json(zstore, f"{prefix}/zarr.json")
    except (ValueError, OSError):
        doc = "unreadable"
    trajstore_doc = isinstance(doc, dict) and isinstance(doc.get("attributes"), dict) \
        and "trajstore" in doc["attributes"]
    if trajstore_doc:
        raise StoreExistsError(f"{where} already holds a trajectory named {name!r}")

    async def keys() -> list[str]:
        return [k async for k in zstore.list_prefix(f"{prefix}/")]

    found = {k.removeprefix(f"{prefix}/") for k in _backend.sync(keys())}
    foreign = sorted(k for k in found if k not in _CREATION_KEYS and not _is_temporary(k.rsplit("/", 1)[-1]))
    if foreign or doc == "unreadable":
        raise StoreExistsError(f"{where}: the folder of trajectory {name!r} holds data trajstore did not write "
                               f"({', '.join(foreign[:3]) or 'an unreadable zarr.json'}); refusing to overwrite it")


def create_arrays(zstore: zarr.abc.store.Store, prefix: str, static: Any) -> None:
    common: dict[str, Any] = {"serializer": BytesCodec(), "compressors": [Crc32cCodec()], "filters": None,
                              "config": {"write_empty_chunks": True}, "overwrite": True}
    zarr.create_array(zstore, name=f"{prefix}/params", shape=(0, static.layout.n), chunks=(1, static.chunk_elems),
                      dtype=static.dtype.numpy_dtype, fill_value=static.dtype.fill_value,
                      dimension_names=PARAMS_DIMS, **common)
    if static.layout.buffer_nbytes:
        zarr.create_array(zstore, name=f"{prefix}/buffers", shape=(0, static.layout.buffer_nbytes),
                          chunks=(1, static.layout.buffer_nbytes), dtype=np.uint8, fill_value=0,
                          dimension_names=BUFFERS_DIMS, **common)
