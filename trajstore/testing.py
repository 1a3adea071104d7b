"""Fault injection for tests: a Zarr store wrapper that fails, truncates or corrupts chosen calls.

A :class:`FaultyStore` wraps any Zarr v3 store and follows a plan of :class:`Fault` rules, each
naming an operation, a glob pattern on the key, which matching calls it hits (counted per rule,
from 1) and what goes wrong: an I/O error, a full disk, short or corrupted data read back, a
partial or corrupted write, a write dropped without a word, or a one-off (transient) error. Every
call is logged, so a test can assert where its faults landed. Use it to check that your own jobs
over a trajectory store turn faults into errors, never into wrong results::

    from zarr.storage import MemoryStore
    from trajstore import TrajectoryStore
    from trajstore.testing import Fault, FaultyStore

    store = FaultyStore(MemoryStore(), [Fault("set", "*/params/c/*", "enospc", at=2)])
    traj = TrajectoryStore.create(store, model)   # a small model: one params chunk per snapshot
    traj.append(model)              # the 1st params chunk written: fine
    traj.append(model)              # the 2nd: OSError(ENOSPC), nothing committed, the store unchanged
    assert [c.key for c in store.faults()] == ["trajectories/default/params/c/1/0"]
    assert len(traj) == 1

A store wrapping a ``LocalStore`` is not recognised as local by trajstore, so the library takes
Zarr's generic path through it (the direct chunk-file writer and reader are bypassed).
"""

from __future__ import annotations

import errno
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Literal

from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

__all__ = ["Call", "Fault", "FaultKind", "FaultyStore", "Op"]

Op = Literal["get", "set", "delete", "list", "exists"]
FaultKind = Literal["eio", "enospc", "transient", "short", "corrupt", "short_write", "corrupt_write", "drop",
                    "lost_reply", "stop"]
_READ_KINDS = {"short", "corrupt"}
_WRITE_KINDS = {"short_write", "corrupt_write", "drop", "lost_reply"}


@dataclass(frozen=True)
class Fault:
    """One rule of a fault plan.

    Parameters
    ----------
    op : {"get", "set", "delete", "list", "exists"}
        The operation it watches (``get`` includes partial reads, ``set`` ``set_if_not_exists``,
        ``delete`` ``delete_dir``, ``list`` every listing, whose key is the prefix).
    key : str
        ``fnmatch`` pattern on the key (``*`` crosses ``/``), e.g. ``"*/params/c/*"``.
    kind : str
        ``eio``: raise ``OSError(EIO)``; ``enospc``: raise ``OSError(ENOSPC)``; ``transient``:
        raise ``TimeoutError`` on the first call hit only, then let every call through;
        ``short`` / ``corrupt`` (get): return the first half of the value / the value with its
        middle byte flipped; ``short_write`` (set): store the first half, then raise
        ``OSError(EIO)``, as a non-atomic backend interrupted mid-write; ``corrupt_write`` (set):
        store the value with its middle byte flipped and report success; ``drop`` (set): store
        nothing and report success; ``lost_reply`` (set): store the value, then raise
        ``TimeoutError``, as an object store whose reply to a completed write was lost; ``stop``:
        send this process SIGSTOP before the call (it goes on, unchanged, once sent SIGCONT): a
        writer paused at a chosen step, as a machine that stalls or a debugger would pause it.
    at : int
        The first matching call hit, counting from 1.
    count : int or None
        How many consecutive matching calls are hit from ``at`` on; None: every one after.
    """

    op: Op
    key: str = "*"
    kind: FaultKind = "eio"
    at: int = 1
    count: int | None = 1

    def __post_init__(self) -> None:
        if self.op not in ("get", "set", "delete", "list", "exists"):
            raise ValueError(f"op must be get, set, delete, list or exists, got {self.op!r}")
        if self.kind in _READ_KINDS and self.op != "get" or self.kind in _WRITE_KINDS and self.op != "set":
            raise ValueError(f"fault kind {self.kind!r} does not apply to op {self.op!r}")
        if self.at < 1 or (self.count is not None and self.count < 1):
            raise ValueError(f"at and count must be >= 1, got at={self.at!r}, count={self.count!r}")

    def hits(self, k: int) -> bool:
        """Whether the ``k``-th matching call (from 1) is hit."""
        return k >= self.at and (self.count is None or k < self.at + self.count)


@dataclass(frozen=True)
class Call:
    """One logged store call: its operation, key, and the fault kind injected (None: none)."""

    op: Op
    key: str
    fault: FaultKind | None = None


@dataclass
class _State:
    """Shared by a store and its read-only / writable views, so counts and the log are one."""

    plan: list[Fault]
    seen: list[int] = field(default_factory=list)
    fired: set[int] = field(default_factory=set)
    log: list[Call] = field(default_factory=list)
    enabled: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)


def _flip(data: bytes) -> bytes:
    if not data:
        return data
    mid = len(data) // 2
    return data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:]


class FaultyStore(WrapperStore[Store]):
    """A Zarr store that injects the faults of ``plan`` into calls to ``store``.

    Every matching rule counts the call; the first rule that hits it decides its fault. Views
    (``with_read_only``) share the plan, the counts and the log. ``enabled = False`` lets every
    call through, uncounted and unlogged (to set up or inspect a store through the wrapper).
    """

    def __init__(self, store: Store, plan: Sequence[Fault] = (), *, _state: _State | None = None) -> None:
        super().__init__(store)
        self._state = _state or _State(list(plan), [0] * len(plan))

    @property
    def enabled(self) -> bool:
        return self._state.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._state.enabled = bool(value)

    def _with_store(self, store: Store) -> FaultyStore:
        return FaultyStore(store, _state=self._state)

    def __repr__(self) -> str:
        return f"FaultyStore({self._store!r}, {len(self._state.plan)} rules)"

    @property
    def calls(self) -> list[Call]:
        """Every call made through the store (and its views) so far, in order."""
        with self._state.lock:
            return list(self._state.log)

    def faults(self) -> list[Call]:
        """The calls a fault was injected into."""
        return [c for c in self.calls if c.fault is not None]

    def _decide(self, op: Op, key: str) -> FaultKind | None:
        if not self.enabled:
            return None
        state, kind = self._state, None
        with state.lock:
            for i, rule in enumerate(state.plan):
                if rule.op != op or not fnmatchcase(key, rule.key):
                    continue
                state.seen[i] += 1
                if kind is None and rule.hits(state.seen[i]) and i not in state.fired:
                    kind = rule.kind
                    if kind == "transient":
                        state.fired.add(i)
            state.log.append(Call(op, key, kind))
        if kind == "eio":
            raise OSError(errno.EIO, f"injected I/O error on {op}", key)
        if kind == "enospc":
            raise OSError(errno.ENOSPC, f"injected: no space left on device on {op}", key)
        if kind == "transient":
            raise TimeoutError(errno.ETIMEDOUT, f"injected transient timeout on {op}", key)
        if kind == "stop":
            import os
            import signal

            os.kill(os.getpid(), signal.SIGSTOP)
            return None
        return kind

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        kind = self._decide("get", key)
        value = await self._store.get(key, prototype, byte_range)
        if value is None or kind is None:
            return value
        data = value.to_bytes()
        return prototype.buffer.from_bytes(data[:len(data) // 2] if kind == "short" else _flip(data))

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def set(self, key: str, value: Buffer) -> None:
        kind = self._decide("set", key)
        if kind == "drop":
            return
        if kind == "lost_reply":
            await self._store.set(key, value)
            raise TimeoutError(errno.ETIMEDOUT, "injected: the reply to a completed write was lost", key)
        if kind in ("short_write", "corrupt_write"):
            data = value.to_bytes()
            data = data[:len(data) // 2] if kind == "short_write" else _flip(data)
            await self._store.set(key, type(value).from_bytes(data))
            if kind == "short_write":
                raise OSError(errno.EIO, "injected I/O error after a partial write", key)
            return
        await self._store.set(key, value)

    async def _get_many(self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
                        ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        for key, value in values:
            await self.set(key, value)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        if not await self._store.exists(key):
            await self.set(key, value)

    async def exists(self, key: str) -> bool:
        self._decide("exists", key)
        return await self._store.exists(key)

    async def delete(self, key: str) -> None:
        self._decide("delete", key)
        await self._store.delete(key)

    async def delete_dir(self, prefix: str) -> None:
        self._decide("delete", prefix)
        await self._store.delete_dir(prefix)

    async def _listed(self, prefix: str, items: AsyncIterator[str]) -> AsyncIterator[str]:
        self._decide("list", prefix)
        async for item in items:
            yield item

    def list(self) -> AsyncIterator[str]:
        return self._listed("", self._store.list())

    def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        return self._listed(prefix, self._store.list_prefix(prefix))

    def list_dir(self, prefix: str) -> AsyncIterator[str]:
        return self._listed(prefix, self._store.list_dir(prefix))
