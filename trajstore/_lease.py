"""One writer per trajectory.

On a local folder the lease is an exclusive ``flock`` on ``writer.lock``: the kernel drops it when
the holding process dies, so a killed writer never leaves the trajectory stuck, and a second
writer on the same machine is refused at once. On other backends (object stores, ``memory://``)
the lease is a JSON document with a heartbeat: a holder refreshes it from a daemon thread every
``ttl / 4`` seconds, and a lease whose heartbeat is older than ``ttl`` (or whose holder, on this
machine, is no longer running) may be taken over. In both cases ``writer.json`` names the holder,
so the refusal says who is writing, and the writer checks that it still holds the lease before
each commit.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from zarr.abc.store import Store

from ._backend import delete_key, local_root, read_json
from ._io import write_json_atomic
from .errors import WriterConflictError

__all__ = ["WriterLease"]

DEFAULT_TTL = 60.0


def _pid_alive(pid: int) -> bool:
    if not 0 < pid < 2**31:  # 0 and negative pids name process groups; larger ones overflow os.kill
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_text(doc: Any) -> str:
    if not isinstance(doc, dict):
        return "an unknown writer"
    since = doc.get("since")
    try:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    except (OverflowError, OSError, ValueError):  # NaN or a time past what the platform represents
        when = "?"
    return f"pid {doc.get('pid')!r:.40} on host {doc.get('host')!r:.100} (writing since {when})"


class WriterLease:
    """The write lease of one trajectory, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, store: Store, prefix: str, *, ttl: float = DEFAULT_TTL) -> None:
        self._store = store
        self._key = f"{prefix}/writer.json"
        self._ttl = ttl
        self._token = uuid.uuid4().hex
        self._root = local_root(store)
        self._lock_path = self._root / prefix / "writer.lock" if self._root is not None else None
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Whether the previous holder may still be running (a lapsed heartbeat, or a lease document
        # it never removed, from a process not known to be dead): its late writes must be fenced.
        self.took_over = False

    @property
    def token(self) -> str:
        return self._token

    @property
    def fenced_by_kernel(self) -> bool:
        """True for an flock: no other process can hold the lease while this one lives."""
        return self._fd is not None

    def _doc(self) -> dict[str, Any]:
        now = time.time()
        return {"token": self._token, "host": socket.gethostname(), "pid": os.getpid(),
                "since": now, "heartbeat": now, "ttl": self._ttl}

    def acquire(self, name: str) -> None:
        """Take the lease (WriterConflictError while another live writer holds it). A failure
        part-way gives back whatever was taken: no heartbeat or flock is left behind."""
        try:
            if self._lock_path is not None:
                self._acquire_flock(name)
                previous = self._read()
                self.took_over = isinstance(previous, dict) and not self._dead(previous)
            else:
                self._acquire_lease(name)
            write_json_atomic(self._store, self._key, self._doc(), durable=False)
        except BaseException:
            self._stop.set()
            try:
                self.release()
            except Exception:
                self.release(quiet=True)
            raise

    def _acquire_flock(self, name: str) -> None:
        import fcntl

        assert self._lock_path is not None
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _holder_text(self._read())
            raise WriterConflictError(
                f"trajectory {name!r} already has a live writer: {holder}; "
                "open it with mode='r' to read, or wait for that writer to close"
            ) from None
        self._fd = fd

    def _acquire_lease(self, name: str) -> None:
        current = self._read()
        if current is not None and self._is_live(current):
            raise WriterConflictError(
                f"trajectory {name!r} already has a live writer: {_holder_text(current)}; "
                f"its lease expires {self._ttl:.0f} s after its last heartbeat"
            )
        self.took_over = current is not None and not self._dead(current)
        write_json_atomic(self._store, self._key, self._doc(), durable=False)
        # A competing taker may have written between our read and write; the last write wins
        # and the loser finds out here (or, at the latest, in check() before its first commit).
        time.sleep(0.05)
        self.check(name)
        self._thread = threading.Thread(target=self._heartbeat, name=f"trajstore-lease-{name}", daemon=True)
        self._thread.start()

    @staticmethod
    def _dead(doc: Any) -> bool:
        """Whether the holder named by ``doc`` is known to be gone (a dead pid on this host)."""
        return (isinstance(doc, dict) and doc.get("host") == socket.gethostname() and isinstance(doc.get("pid"), int)
                and not _pid_alive(doc["pid"]))

    def _is_live(self, doc: Any) -> bool:
        if not isinstance(doc, dict):
            return False
        if doc.get("host") == socket.gethostname() and isinstance(doc.get("pid"), int):
            if not _pid_alive(doc["pid"]):
                return False
        heartbeat, ttl = doc.get("heartbeat"), doc.get("ttl", self._ttl)
        if not isinstance(heartbeat, (int, float)) or not isinstance(ttl, (int, float)):
            return False
        try:
            return time.time() - heartbeat < ttl
        except OverflowError:  # a 400-digit JSON integer: no float, no lease
            return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(self._ttl / 4):
            doc = self._read()
            if isinstance(doc, dict) and doc.get("token") != self._token:
                return  # another writer holds it now: stop beating
            if not isinstance(doc, dict):
                continue  # unreadable for now: the next beat looks again
            doc["heartbeat"] = time.time()
            try:
                write_json_atomic(self._store, self._key, doc, durable=False)
            except Exception:  # a transient backend error: the next beat retries
                continue

    def _read(self) -> Any:
        """The lease document; None when absent, or when it stays unreadable. A document that does
        not parse is read again a few times first: on a backend whose writes are not atomic
        (fsspec's local file system truncates, then writes) it is a heartbeat caught mid-write, and
        taking it for "no lease" would depose a live writer or make one think it lost its lease."""
        for attempt in range(6):
            try:
                return read_json(self._store, self._key)
            except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested past the parser's depth
                time.sleep(0.005 * 2**attempt)
        return None

    def check(self, name: str) -> None:
        """Raise WriterConflictError unless this lease is still ours."""
        if self._fd is not None:
            return  # the kernel holds the flock for us until we close it
        doc = self._read()
        if not isinstance(doc, dict) or doc.get("token") != self._token:
            raise WriterConflictError(
                f"lost the write lease of trajectory {name!r} to {_holder_text(doc)}; nothing was committed"
            )

    def release(self, *, quiet: bool = False) -> None:
        """Give the lease up. ``quiet``: touch no store (from ``__del__``); the flock still drops,
        and a heartbeat lease then lapses after its ttl."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
            self._thread = None
        if quiet:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            return
        doc = self._read()
        if isinstance(doc, dict) and doc.get("token") == self._token:
            try:
                delete_key(self._store, self._key)
            except Exception:
                pass
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    @property
    def lock_path(self) -> Path | None:
        return self._lock_path
