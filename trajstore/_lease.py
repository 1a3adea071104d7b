"""One writer per trajectory.

On a local folder the lease is an exclusive ``flock`` on the trajectory's folder itself: the kernel
drops it when the holding process dies, so a killed writer never leaves the trajectory stuck, and
a second writer on the same machine is refused at once. Locking the folder leaves no file behind
(a lock file in the trajectory's group is an object Zarr does not recognise, and every Zarr
listing of the group warns about it). Where a folder cannot be locked (``flock`` on an NFS mount
is emulated by a byte-range lock, which needs a descriptor open for writing) the lease falls back
to an flock on ``writer.lock``, created in the folder. On other backends (object stores,
``memory://``) the lease is a JSON document with a heartbeat: a holder refreshes it from a daemon
thread every ``ttl / 4`` seconds, and a lease whose heartbeat is older than ``ttl`` (or whose
holder, on this machine, is no longer running) may be taken over. In both cases ``writer.json``
names the holder, so the refusal says who is writing, and the writer checks that it still holds
the lease before each commit.

Earlier trajstore writers locked ``writer.lock`` only (creating it, never removing it). So that one
of them and a current writer never both hold a trajectory, a current writer also locks
``writer.lock`` wherever it exists, without creating it: it exists in every trajectory such a
writer ever opened, and a refusal on it names the holder as usual. (Creating it would keep the
file Zarr warns about; removing it on release cannot be made safe against a writer that locks it
by name without checking what it locked.) One case is left to a check: an earlier writer opening a
trajectory that no earlier writer had opened, while a current writer holds it, creates
``writer.lock`` and gets it. The current writer looks for the file before each commit (one
``open``) and, when it cannot lock it, raises WriterConflictError instead of committing; the
earlier writer's generation fences off its later commits anyway. Only a commit already past that
check when the earlier writer took the file can land beside it.
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
# The lock file of earlier trajstore writers, locked where it exists (see the module docstring).
LEGACY_LOCK = "writer.lock"


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
        self._folder = self._root / prefix if self._root is not None else None
        self._lock_path = self._folder  # what the primary flock is on: the folder, or LEGACY_LOCK in it
        self._fd: int | None = None
        self._legacy_fd: int | None = None  # LEGACY_LOCK's flock, held beside the folder's
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
            if self._folder is not None:
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
        """The folder's flock, then LEGACY_LOCK's where it exists; LEGACY_LOCK alone (created)
        where the folder cannot be locked."""
        import fcntl

        assert self._folder is not None
        self._folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._conflict(name) from None
        except OSError:  # EBADF, ENOLCK, EINVAL: this file system locks files, not folders
            os.close(fd)
            self._lock_path = self._folder / LEGACY_LOCK
            self._fd = self._lock_file(name, create=True)
            return
        self._fd = fd
        self._legacy_fd = self._lock_file(name, create=False)

    def _lock_file(self, name: str, *, create: bool) -> int | None:
        """An flock on LEGACY_LOCK (None when it is absent and not to be created)."""
        import fcntl

        assert self._folder is not None
        path = self._folder / LEGACY_LOCK
        try:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            if create:
                raise
            return None
        except PermissionError:  # another user's file: a local flock needs no write access
            if create:
                raise
            fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._conflict(name) from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _conflict(self, name: str) -> WriterConflictError:
        return WriterConflictError(
            f"trajectory {name!r} already has a live writer: {_holder_text(self._read())}; "
            "open it with mode='r' to read, or wait for that writer to close"
        )

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
            # The kernel holds the flock for us until we close it; a writer of an earlier
            # trajstore may have created LEGACY_LOCK since (see the module docstring).
            if self._legacy_fd is None and self._lock_path == self._folder:
                try:
                    self._legacy_fd = self._lock_file(name, create=False)
                except WriterConflictError:
                    raise WriterConflictError(
                        f"lost the write lease of trajectory {name!r} to a writer of an earlier trajstore version "
                        f"({_holder_text(self._read())}), which locks only {LEGACY_LOCK}; nothing was committed"
                    ) from None
            return
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
            self._close_locks()
            return
        doc = self._read()
        if isinstance(doc, dict) and doc.get("token") == self._token:
            try:
                delete_key(self._store, self._key)
            except Exception:
                pass
        self._close_locks()

    def _close_locks(self) -> None:
        for fd in (self._legacy_fd, self._fd):
            if fd is not None:
                os.close(fd)  # closing the descriptor drops the flock
        self._fd = self._legacy_fd = None

    @property
    def lock_path(self) -> Path | None:
        """What the flock is on: the trajectory's folder (or its LEGACY_LOCK); None off local folders."""
        return self._lock_path
