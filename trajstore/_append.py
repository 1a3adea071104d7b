"""The transaction of one append: a row taken, written, then committed or undone.

:class:`AppendPath` is mixed into :class:`~trajstore.store.TrajectoryStore`. An append is
``_begin_row`` (the next index and its physical row, with room for it), the chunk writes (the
store's own :class:`~trajstore._write.RowWriter`, or, for
:class:`~trajstore.sharded.ShardedRecorder`, every rank's), and ``_commit_row`` (fsync, the lease
checked, one commit document); a failure between them is undone by ``_abort_row``. See
:mod:`trajstore._log` for why a commit counts and :mod:`trajstore._write` for the row's keys.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import _backend, _io, _log
from ._localread import RowRef
from ._records import SnapshotRecord
from .errors import ReadOnlyError, TrajstoreError, WriterConflictError

if TYPE_CHECKING:
    from ._lease import WriterLease
    from ._write import RowWriter

__all__ = ["AppendPath", "read_only_error"]


def read_only_error(where: str, e: OSError) -> ReadOnlyError:
    return ReadOnlyError(f"{where} cannot be written ({e.strerror or e}): a read-only folder or mount; "
                         "open it with mode='r' to read")


class AppendPath:
    """The append transaction of a trajectory open for appending (state set by TrajectoryStore)."""

    _mode: str
    _where: str
    _name: str
    _prefix: str
    _durable: bool
    _zstore: Any
    _poisoned: str | None
    _lease: WriterLease | None
    _gen: _log.Generation | None
    _writer: RowWriter | None
    _commits: list[_log.Commit]
    _refs: list[RowRef]
    _count: int

    def _check_appendable(self) -> None:
        if self._mode != "a":
            raise ReadOnlyError(f"{self._where} trajectory {self._name!r} is open read-only; open it with mode='a' to append")
        if self._poisoned:
            raise WriterConflictError(f"trajectory {self._name!r}: this handle can append no more ({self._poisoned})")

    def _begin_row(self) -> tuple[int, int]:
        """The next snapshot's index and physical row, with room for the row (step 1 of an append;
        :class:`~trajstore.sharded.ShardedRecorder` has other processes write parts of the row)."""
        self._check_appendable()
        assert self._lease is not None and self._gen is not None and self._writer is not None
        index = self._count
        row = index + self._gen.offset
        self._lease.check(self._name)
        try:
            self._writer.ensure_capacity(row)
        except Exception as e:
            raise self._abort_row(index, row, e)  # type: ignore[misc]
        return index, row

    def _abort_row(self, index: int, row: int, error: Exception) -> Exception:
        """The error to raise for a row that will not be committed (its chunks removed)."""
        failed = self._append_failed(index, row, error, None)
        assert failed is not None
        if failed is not error:
            failed.__cause__ = error
        return failed

    def _commit_row(self, index: int, row: int, crcs: Sequence[int], buffers_crc: int | None, record: SnapshotRecord,
                    started: float) -> int:
        """Commit row ``row``, all of whose chunks are written, as snapshot ``index`` (the last
        step of an append): fsync the row's folders, check the lease, write the commit document."""
        assert self._lease is not None and self._gen is not None and self._writer is not None
        commit: _log.Commit | None = None
        try:
            self._writer.sync_row(row)
            self._lease.check(self._name)
            record["append_seconds"] = time.time() - started
            commit = _log.Commit(index, self._gen.seq, self._gen.token, row, record, tuple(crcs), buffers_crc)
            _log.write_commit(self._zstore, self._prefix, commit, durable=self._durable)
        except Exception as e:
            error = self._append_failed(index, row, e, commit)
            if error is None:
                return index  # the commit document was written after all
            if error is e:
                raise
            raise error from e
        self._adopt(commit)
        if not self._lease.fenced_by_kernel:
            self._check_not_fenced(index)
        return index

    def _adopt(self, commit: _log.Commit) -> None:
        self._commits.append(commit)
        self._refs.append(RowRef(commit.index, commit.row, commit.crc))
        if (commit.index + 1) % _log.SEGMENT == 0 and _log.worth_sealing(len(commit.crc or ())):
            seg = commit.index // _log.SEGMENT
            try:  # an index for readers: a failed seal only makes opening read more documents
                _log.write_seal(self._zstore, self._prefix, seg, self._gen, self._commits[seg * _log.SEGMENT:])
            except Exception:
                pass

    def _check_not_fenced(self, index: int) -> None:
        """After a commit on a heartbeat lease: did another writer take over meanwhile?"""
        assert self._gen is not None
        newer = _log.newer_generations(self._zstore, self._prefix, self._gen)
        if not newer:
            return
        fenced = any(g.base <= index for g in newer)
        if fenced:
            self._commits.pop()
            self._refs.pop()
        self._poisoned = "another writer took the trajectory over"
        what = ("nothing was committed (the new writer's log fences it off)" if fenced else
                f"snapshot {index} was committed just before it")
        raise WriterConflictError(f"lost the write lease of trajectory {self._name!r} to another writer: {what}")

    def _append_failed(self, index: int, row: int, error: Exception, commit: _log.Commit | None) -> Exception | None:
        """After a failed append of snapshot ``index``: undo what it wrote and return the error to raise.

        ``commit`` is the commit the append was writing when it failed (None: it failed before).
        A commit document found on the store as written (a reply lost after the write) is adopted
        and None returned. Otherwise the row's chunks are deleted, so a full disk gets its space
        back (the row is this writer's own: no other writer's commit can name it); a commit whose
        fate cannot be told leaves this handle unable to append (reopening starts a generation
        that fences the commit off, should it land late).
        """
        what = f"snapshot {index} of trajectory {self._name!r} in {self._where}"
        if commit is not None:
            key = _log.commit_key(self._prefix, commit.index, commit.seq, commit.token)
            try:
                stored = _io.parse_json(_backend.sync(_io.get_bytes(self._zstore, key)), key)
            except Exception:
                stored = "unknown"
            if stored == commit.to_json():
                self._adopt(commit)
                return None
            if stored is not None:
                try:
                    _backend.delete_key(self._zstore, key)
                except Exception:
                    self._poisoned = f"whether {what} was committed is unknown"
                    error.add_note(f"whether {what} was committed is unknown (its commit document could not be read "
                                   "back nor removed); reopen the store to see")
                    return error
        state = "the store is unchanged" if self._writer is not None and self._writer.discard_row(row) else \
            "its partial row could not all be removed (the next append overwrites it)"
        if isinstance(error, OSError) and error.errno == errno.ENOSPC and not isinstance(error, TrajstoreError):
            return OSError(errno.ENOSPC, f"no space left on device while writing {what}: nothing was committed "
                                         f"and {state} ({error})")
        if isinstance(error, OSError) and error.errno == errno.EROFS and not isinstance(error, TrajstoreError):
            return read_only_error(self._where, error)
        error.add_note(f"{what} was not committed; {state}")
        return error
