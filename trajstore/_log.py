"""The commit log of a trajectory (store format 2): fenced commits of constant cost.

Layout, under ``trajectories/NAME/log/``::

    gen/{seq:08d}-{token}.json                    one per writer session (a *generation*):
                                                  {"seq", "token", "base", "offset", "host", "pid", "since"}
    commit/{seg:06d}/{index:010d}-{seq:08d}-{token}.json
                                                  one per committed snapshot: {"index", "seq", "token",
                                                  "row", "record", "crc", "buffers_crc"}
    seal/{seg:06d}-{seq:08d}-{token}.json         the SEGMENT commits of a full segment in one document

A commit writes one new, never rewritten document, so its cost does not grow with the number of
snapshots (format 1 rewrote every record on every commit). Keys are unique per generation, so two
writers never write the same key, and which commits count is decided by readers, by one rule:

    A commit of snapshot ``i`` by generation ``g`` is valid iff ``g``'s marker exists and every
    generation ordered after ``g`` (by ``(seq, token)``) has ``base > i``.

A writer that takes a trajectory over writes its marker with ``base`` = the committed count it
sees, so every later commit of an older (deposed, perhaps paused) writer at ``i >= base`` is
fenced off for every reader, whenever it lands. Each snapshot index has at most one valid commit
(an older generation's commit at ``i`` needs ``i < base`` of the newer, whose own commits are at
``i >= base``), and the committed count is the length of the run of valid commits from 0.

Data rows are fenced too: a commit names the physical ``row`` of ``params`` and ``buffers`` that
holds its snapshot, ``row = index + offset``, and a generation that takes over from a writer that
may still be alive takes ``offset`` = the largest offset so far + 1, so chunk writes a deposed
writer still has in flight land in rows no valid commit names. After a clean release or a dead
holder (nothing can be in flight) the offset is kept, so a trajectory written by one process at
a time has ``row == index``. Each commit also records the crc32c of every chunk of its row, so a
chunk found in the wrong row (valid checksum, wrong place) is caught by every read.

Seals are an index for readers, not a second source of truth: a reader takes a segment from a
seal only when every entry of the seal is valid by the rule above, else it lists the segment's
commit documents. Every document read is hostile input: keys are parsed by pattern, documents
are size-capped and checked field by field before anything is allocated from them.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from zarr.abc.store import Store

from . import _backend, _io
from ._records import MAX_SNAPSHOTS, SnapshotRecord, check_record
from .errors import InvalidStoreError, StoreUnreachableError

__all__ = ["Commit", "Generation", "LogState", "SEGMENT", "commit_key", "fences", "new_token", "read_log", "resolve",
           "seal_key", "start_generation", "write_commit", "write_format1", "write_generation", "write_seal"]

SEGMENT = 256        # commits per sealed segment: a reader reads t / 256 seals plus at most 255 commits
MAX_ROWS = 2**40     # physical rows a commit may name (offsets grow by one per takeover)
MAX_CHUNKS = 2**20   # params chunks per snapshot: a commit lists one crc32c each (<= ~11 MiB of JSON)
MAX_GENERATIONS = 1_000_000
MAX_WRITERS = 65_536     # processes of one sharded writer session
MAX_DOC_BYTES = 16 * 2**20  # a seal of 256 records with RNG states is ~1.8 MB
_TOKEN = r"[0-9a-f]{32}"
_GEN_NAME = re.compile(rf"(\d{{8}})-({_TOKEN})\.json")
_COMMIT_NAME = re.compile(rf"(\d{{10}})-(\d{{8}})-({_TOKEN})\.json")
_SEAL_NAME = re.compile(rf"(\d{{6}})-(\d{{8}})-({_TOKEN})\.json")
_SEG_NAME = re.compile(r"\d{6}")


def new_token() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, order=True)
class Generation:
    """One writer session: ordered by ``(seq, token)``; ``base`` fences older sessions' commits."""

    seq: int
    token: str
    base: int = 0
    offset: int = 0
    writers: int = 1  # processes writing the session's rows together (trajstore.sharded)

    @property
    def name(self) -> str:
        return f"{self.seq:08d}-{self.token}"

    def to_json(self, **extra: Any) -> dict[str, Any]:
        return {"seq": self.seq, "token": self.token, "base": self.base, "offset": self.offset,
                "writers": self.writers, **extra}


@dataclass(frozen=True)
class Commit:
    """One committed snapshot: where its data is and what it must read back as."""

    index: int
    seq: int
    token: str
    row: int
    record: SnapshotRecord
    crc: tuple[int, ...] | None      # crc32c of each params chunk of the row; None: a format-1 commit
    buffers_crc: int | None

    @property
    def generation(self) -> tuple[int, str]:
        return (self.seq, self.token)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "seq": self.seq, "token": self.token, "row": self.row, "record": self.record,
                "crc": None if self.crc is None else list(self.crc), "buffers_crc": self.buffers_crc}


@dataclass(frozen=True)
class LogState:
    """What a reader makes of a log: the valid commits in index order, and what does not count."""

    generations: tuple[Generation, ...]
    commits: tuple[Commit, ...]
    fenced: tuple[Commit, ...]   # commits that do not count (a deposed writer's, or past a gap)
    problems: tuple[str, ...]    # documents that could not be used (damaged, foreign names)

    @property
    def count(self) -> int:
        return len(self.commits)

    @property
    def max_offset(self) -> int:
        return max((g.offset for g in self.generations), default=0)

    @property
    def next_seq(self) -> int:
        return max((g.seq for g in self.generations), default=0) + 1


def gen_key(prefix: str, gen: Generation) -> str:
    return f"{prefix}/log/gen/{gen.name}.json"


def commit_key(prefix: str, index: int, seq: int, token: str) -> str:
    return f"{prefix}/log/commit/{index // SEGMENT:06d}/{index:010d}-{seq:08d}-{token}.json"


def seal_key(prefix: str, segment: int, seq: int, token: str) -> str:
    return f"{prefix}/log/seal/{segment:06d}-{seq:08d}-{token}.json"


# ------------------------------------------------------------------ the rule

def resolve(generations: Iterable[Generation], candidates: Iterable[Commit]) -> tuple[list[Commit], list[Commit]]:
    """The valid commits in index order (the run from 0) and the rest; see the module docstring."""
    fence = fences(generations)
    by_index: dict[int, Commit] = {}
    rest: list[Commit] = []
    for c in candidates:
        limit = fence.get(c.generation)
        if limit is None or c.index >= limit:
            rest.append(c)
        elif c.index in by_index and by_index[c.index] != c:
            rest.append(c)  # cannot happen for honest writers; kept out rather than guessed
        else:
            by_index[c.index] = c
    valid: list[Commit] = []
    while len(valid) in by_index:
        valid.append(by_index.pop(len(valid)))
    rest.extend(by_index.values())  # valid by the rule but past a gap: not reachable
    return valid, rest


def fences(generations: Iterable[Generation]) -> dict[tuple[int, str], int]:
    """Per generation, the smallest ``base`` of the generations ordered after it: its commits at
    indices from there on are fenced off."""
    fence: dict[tuple[int, str], int] = {}
    lowest = MAX_SNAPSHOTS
    for g in sorted(set(generations), reverse=True):
        fence[(g.seq, g.token)] = lowest
        lowest = min(lowest, g.base)
    return fence


# ------------------------------------------------------------------ reading

def _int(value: object, lo: int, hi: int) -> bool:
    return type(value) is int and lo <= value <= hi


def parse_generation(doc: object, seq: int, token: str) -> Generation:
    if not isinstance(doc, dict) or doc.get("seq") != seq or doc.get("token") != token:
        raise ValueError("its seq and token differ from its name")
    base, offset, writers = doc.get("base"), doc.get("offset"), doc.get("writers", 1)
    if not _int(base, 0, MAX_SNAPSHOTS) or not _int(offset, 0, MAX_ROWS):
        raise ValueError(f"base {base!r:.40} / offset {offset!r:.40} out of range")
    if not _int(writers, 1, MAX_WRITERS):
        raise ValueError(f"writers {writers!r:.40} out of range")
    return Generation(seq, token, base, offset, writers)


def parse_commit_doc(doc: object, n_chunks: int, where: str) -> Commit:
    """A commit document checked field by field (ValueError on anything wrong)."""
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    index, seq, token, row = doc.get("index"), doc.get("seq"), doc.get("token"), doc.get("row")
    if not _int(index, 0, MAX_SNAPSHOTS - 1) or not _int(seq, 0, 10**8 - 1) or not _int(row, 0, MAX_ROWS):
        raise ValueError(f"index {index!r:.40}, seq {seq!r:.40} or row {row!r:.40} out of range")
    if not isinstance(token, str) or re.fullmatch(_TOKEN, token) is None:
        raise ValueError(f"token {token!r:.40} is not 32 hex digits")
    crc = doc.get("crc")
    if crc is not None:
        if not isinstance(crc, list) or len(crc) != n_chunks or not all(_int(c, 0, 2**32 - 1) for c in crc):
            raise ValueError(f"crc must list {n_chunks} crc32c values")
        crc = tuple(crc)
    bcrc = doc.get("buffers_crc")
    if bcrc is not None and not _int(bcrc, 0, 2**32 - 1):
        raise ValueError(f"buffers_crc {bcrc!r:.40} is not a crc32c value")
    try:
        record = check_record(index, doc.get("record"), where)
    except InvalidStoreError as e:
        raise ValueError(str(e)) from None
    return Commit(index, seq, token, row, record, crc, bcrc)


async def _list(store: Store, prefix: str) -> list[str]:
    try:
        return [name async for name in store.list_dir(prefix)]
    except FileNotFoundError:
        return []


async def _get_json(store: Store, key: str) -> Any:
    return _io.parse_json(await _io.get_bytes(store, key, limit=MAX_DOC_BYTES), key)


async def _read_docs(store: Store, keys: Sequence[str]) -> list[Any]:
    """The documents at ``keys`` (an exception object in place of one that cannot be read)."""
    sem = asyncio.Semaphore(64)

    async def one(key: str) -> Any:
        async with sem:
            try:
                return await _get_json(store, key)
            except StoreUnreachableError:  # a commit not read is not a damaged one: the log is unknown
                raise
            except Exception as e:
                return e

    return await asyncio.gather(*(one(k) for k in keys))


def read_log(store: Store, prefix: str, n_chunks: int, where: str) -> LogState:
    """Read and resolve the log at ``prefix/log`` (one listing per folder, documents read concurrently)."""
    return _backend.sync(_read_log(store, prefix, n_chunks, where))


async def _read_log(store: Store, prefix: str, n_chunks: int, where: str) -> LogState:
    root = f"{prefix}/log"
    problems: list[str] = []
    gen_names, seal_names, seg_names = await asyncio.gather(
        _list(store, f"{root}/gen"), _list(store, f"{root}/seal"), _list(store, f"{root}/commit"))
    gens = await _read_generations(store, root, gen_names, problems)
    if len(gens) > MAX_GENERATIONS:
        raise InvalidStoreError(f"{where}: {len(gens)} writer generations, more than {MAX_GENERATIONS}")
    candidates: list[Commit] = []
    sealed = await _read_seals(store, root, seal_names, gens, n_chunks, where, problems)
    for seg, commits in sealed.items():
        candidates.extend(commits)
    segments = sorted(s for s in seg_names if _SEG_NAME.fullmatch(s) and int(s) not in sealed)
    problems += [f"{root}/commit/{s}: not a segment folder" for s in seg_names if not _SEG_NAME.fullmatch(s)]
    listed = await asyncio.gather(*(_list(store, f"{root}/commit/{s}") for s in segments))
    keys, names = [], []
    for s, files in zip(segments, listed):
        for f in files:
            m = _COMMIT_NAME.fullmatch(f)
            if m is None or int(m.group(1)) // SEGMENT != int(s):
                if not f.endswith(".partial"):
                    problems.append(f"{root}/commit/{s}/{f}: not a commit document name")
                continue
            keys.append(f"{root}/commit/{s}/{f}")
            names.append(m)
    for key, m, doc in zip(keys, names, await _read_docs(store, keys)):
        try:
            if isinstance(doc, Exception):
                raise ValueError(f"{type(doc).__name__}: {doc}")
            c = parse_commit_doc(doc, n_chunks, where)
            if (c.index, c.seq, c.token) != (int(m.group(1)), int(m.group(2)), m.group(3)):
                raise ValueError("its index, seq and token differ from its name")
        except ValueError as e:
            problems.append(f"{key}: {e}")
            continue
        candidates.append(c)
    valid, rest = resolve(gens, candidates)
    return LogState(tuple(sorted(gens)), tuple(valid), tuple(rest), tuple(problems))


async def _read_generations(store: Store, root: str, names: list[str], problems: list[str]) -> list[Generation]:
    parsed = [(f, _GEN_NAME.fullmatch(f)) for f in names]
    keys = [f"{root}/gen/{f}" for f, m in parsed if m]
    problems += [f"{root}/gen/{f}: not a generation name" for f, m in parsed if not m and not f.endswith(".partial")]
    gens = []
    for key, (f, m), doc in zip(keys, [p for p in parsed if p[1]], await _read_docs(store, keys)):
        assert m is not None
        try:
            if isinstance(doc, Exception):
                raise ValueError(f"{type(doc).__name__}: {doc}")
            gens.append(parse_generation(doc, int(m.group(1)), m.group(2)))
        except ValueError as e:
            problems.append(f"{key}: {e}")
    return gens


async def _read_seals(store: Store, root: str, names: list[str], gens: list[Generation], n_chunks: int,
                      where: str, problems: list[str]) -> dict[int, list[Commit]]:
    """Segments taken from seals whose entries are all valid (the highest generation's first)."""
    parsed = sorted(((int(m.group(1)), int(m.group(2)), m.group(3)), f) for f in names
                    if (m := _SEAL_NAME.fullmatch(f)))
    keys = [f"{root}/seal/{f}" for _, f in parsed]
    docs = await _read_docs(store, keys)
    out: dict[int, list[Commit]] = {}
    # Per segment, the seal of the newest generation first.
    for ((seg, seq, token), _), key, doc in sorted(zip(parsed, keys, docs), key=lambda x: (x[0][0][0], -x[0][0][1])):
        if seg in out:
            continue
        try:
            entries = doc.get("entries") if isinstance(doc, dict) else None
            if doc is None or isinstance(doc, Exception) or not isinstance(entries, list) or len(entries) != SEGMENT:
                raise ValueError(f"not a seal of {SEGMENT} entries")
            commits = [parse_commit_doc(e, n_chunks, where) for e in entries]
        except ValueError as e:
            problems.append(f"{key}: {e}")
            continue
        if [c.index for c in commits] != list(range(seg * SEGMENT, (seg + 1) * SEGMENT)):
            problems.append(f"{key}: entries are not the snapshots of segment {seg}")
            continue
        fence = fences(gens)
        if all(c.generation in fence and c.index < fence[c.generation] for c in commits):
            out[seg] = commits  # else the segment's commit documents are listed
    return out


# ------------------------------------------------------------------ writing

def write_generation(store: Store, prefix: str, gen: Generation, *, durable: bool) -> None:
    doc = gen.to_json(host=socket.gethostname(), pid=os.getpid(), since=time.time())
    _io.write_json_atomic(store, gen_key(prefix, gen), doc, durable=durable)


def delete_generation(store: Store, prefix: str, gen: Generation) -> None:
    _backend.delete_key(store, gen_key(prefix, gen))


def write_commit(store: Store, prefix: str, commit: Commit, *, durable: bool) -> str:
    key = commit_key(prefix, commit.index, commit.seq, commit.token)
    _io.write_json_atomic(store, key, commit.to_json(), durable=durable)
    return key


def worth_sealing(n_chunks: int) -> bool:
    """Whether a seal of SEGMENT commits stays well under MAX_DOC_BYTES (11 bytes per crc32c)."""
    return SEGMENT * (n_chunks * 11 + 8_000) < MAX_DOC_BYTES // 2


def write_seal(store: Store, prefix: str, segment: int, gen: Generation, commits: Sequence[Commit]) -> None:
    """One document for a full segment (an index for readers; losing it loses nothing)."""
    _io.write_json_atomic(store, seal_key(prefix, segment, gen.seq, gen.token),
                               {"segment": segment, "entries": [c.to_json() for c in commits]}, durable=False)


def commits_from_format1(count: int, records: Sequence[SnapshotRecord]) -> tuple[Generation, list[Commit]]:
    """A format-1 trajectory's commits as a log: one generation (seq 0) and ``row == index``."""
    gen = Generation(0, "0" * 32, 0, 0)
    return gen, [Commit(i, 0, gen.token, i, dict(r), None, None) for i, r in enumerate(records[:count])]


def newer_generations(store: Store, prefix: str, gen: Generation) -> list[Generation]:
    """Generations ordered after ``gen`` now on the store: one listing, and only their markers read."""
    async def run() -> list[Generation]:
        names = await _list(store, f"{prefix}/log/gen")
        later = [f for f in names if (m := _GEN_NAME.fullmatch(f)) and (int(m.group(1)), m.group(2)) > (gen.seq, gen.token)]
        return await _read_generations(store, f"{prefix}/log", later, [])

    return _backend.sync(run())


def write_format1(store: Store, prefix: str, gen0: Generation, commits: Sequence[Commit], *, durable: bool) -> None:
    """The log of a format-1 trajectory (its one generation, seals of full segments, commit
    documents of the rest); rewriting it is harmless, so a migration killed part-way runs again."""
    write_generation(store, prefix, gen0, durable=durable)
    for start in range(0, len(commits), SEGMENT):
        part = commits[start:start + SEGMENT]
        if len(part) == SEGMENT:
            write_seal(store, prefix, start // SEGMENT, gen0, part)
        else:
            for c in part:
                write_commit(store, prefix, c, durable=False)
    if durable:
        _backend.fsync_local(store, [gen_key(prefix, gen0)] + [commit_key(prefix, c.index, c.seq, c.token)
                                                               for c in commits[len(commits) // SEGMENT * SEGMENT:]])


def start_generation(store: Store, prefix: str, lease: Any, n_chunks: int, *, durable: bool, name: str,
                     where: str, writers: int = 1) -> tuple[Generation, LogState]:
    """Start a writer session under ``lease`` (a held :class:`~trajstore._lease.WriterLease`): its
    marker fences off every later commit of the writers before it. Returns the generation and the
    log as it stood (its ``count`` is the generation's ``base``).

    Its rows are offset past every earlier writer's when the previous holder may still be running
    (a lapsed heartbeat), or when the previous session had several writers (``writers`` > 1: the
    processes that wrote its rows beside the lease holder may outlive it): their in-flight chunk
    writes must land in rows nobody commits.
    On a heartbeat lease two takers may start at once: whoever sees another marker of its seq (or
    a later one) yields, so at most one of two goes on (at least one sees the other)."""
    from .errors import WriterConflictError

    state = read_log(store, prefix, n_chunks, where)
    latest = max(state.generations, default=None)
    offset = state.max_offset + (1 if lease.took_over or (latest is not None and latest.writers > 1) else 0)
    if offset + MAX_SNAPSHOTS > MAX_ROWS:  # rows past MAX_ROWS would be committed, then read by no one
        raise InvalidStoreError(f"{where}: the commit log's writer offsets reach {offset} rows (a damaged or "
                                f"hostile log: each takeover adds one); no writer can start")
    gen = Generation(state.next_seq, lease.token, state.count, offset, writers)
    write_generation(store, prefix, gen, durable=durable)
    if not lease.fenced_by_kernel:
        time.sleep(0.05)
        rivals = [g for g in newer_generations(store, prefix, Generation(gen.seq, "0" * 32)) if g.token != gen.token]
        if rivals:
            try:
                delete_generation(store, prefix, gen)
            except Exception:
                pass
            raise WriterConflictError(f"trajectory {name!r}: another process took the write lease at the same "
                                      "moment; nothing was written, try again")
        lease.check(name)
    return gen, state
