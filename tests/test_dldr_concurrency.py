"""Bases under concurrency and hostile names (issue: two processes computing a basis of one name).

Two real processes compute a basis of the same name at once, on a local folder and on an fsspec
``local://`` URL, with the same or different windows, with and without ``overwrite``, started
after small seeded random delays, some over a basis of that name already stored. Each process
must end with a documented trajstore error or a basis equal to a fresh computation of what it
asked for; the stored basis must be one whole computation: equal to a fresh one of the window it
records, its recorded orthonormality the real one. Then regression tests: an opened Basis says it
was recomputed instead of mixing two computations, hostile stored names are refused, a bad name
is refused before any work, and a basis of the layout before version folders still reads.

Tolerances (against the in-memory ``dldr`` of the same float32 snapshots in float64): singular
values to 1e-9 relative (both are float64 eigenvalues of the same Gram matrix, ~t eps sigma_1^2);
U to 1e-6 absolute (the store keeps U in float32: rounding <= 2^-24 |U| <= 6e-8, plus the float64
differences, ~1e-12); the mean to 1e-6 of its largest entry (float32 rounding, 6e-8 relative).
Against a fresh computation on a store the result is bit for bit wherever both racers' windows
end at the same snapshot (their Gram matrices are then the same sums; with different ends one may
have extended the other's cached Gram matrix, whose float64 sums then differ in the last bits).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from torch import nn

import trajstore
from trajstore import TrajectoryStore, open_basis
from trajstore.errors import CorruptSnapshotError, InvalidStoreError, TrajstoreError

N = 1990          # parameters: 32 row chunks of 64 (the last one short)
T = 12            # snapshots
D = 3
CHUNK_BYTES = 256  # 64 float32 values per chunk
BLOCK_BYTES = 8 * 64 * T * 4  # 8 chunks per block: 4 blocks per pass, each writing 8 row chunks of U
NAME = "same"
OPTIONS = {"auto_mkdir": True}
U_ATOL, SIGMA_RTOL, MEAN_RTOL = 1e-6, 1e-9, 1e-6  # see the module docstring
A, B, C = (0, 12), (3, 12), (0, 8)

# One child per racer: imports, says "ready", waits for "go", sleeps its delay, computes, and
# prints one JSON line: what it returned (and saves the basis it read back) or what it raised.
CHILD = r"""
import json, os, sys, time
import numpy as np
import trajstore, trajstore.dldr, dask.threaded
from trajstore import TrajectoryStore
url, start, stop, d, overwrite, delay, out, block_bytes = sys.argv[1:9]
store = TrajectoryStore.open(url, "r", storage_options={"auto_mkdir": True}) if "://" in url else url
print("ready", flush=True)
sys.stdin.readline()
time.sleep(float(delay))
report = {"began": time.time()}
try:
    basis = trajstore.dldr(store, int(d), start=int(start), stop=int(stop), name="same", overwrite=overwrite == "1",
                           block_bytes=int(block_bytes), num_workers=1)
    report.update(outcome="basis", window=[basis.start, basis.stop], version=basis.metadata.get("version"))
    try:
        np.savez(out, u=basis.to_numpy(), mean=basis.mean, sigma=basis.singular_values)
        report["read"] = "ok"
    except trajstore.TrajstoreError as e:  # replaced by the other racer's commit since: it must say so
        report["read"] = f"{type(e).__name__}: {e}"
except trajstore.TrajstoreError as e:
    report.update(outcome="error", error=type(e).__name__, message=str(e))
except Exception as e:
    report.update(outcome="crash", error=f"{type(e).__module__}.{type(e).__name__}", message=repr(e))
report["ended"] = time.time()
print(json.dumps(report), flush=True)
os._exit(0)  # skip the interpreter's teardown: the report is out
"""


class Vec(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(N))


def walk() -> np.ndarray:
    """T snapshots of a random walk with a decaying spectrum (distinct top directions)."""
    rng = np.random.default_rng(3)
    steps = rng.standard_normal((T, 6)) * (2.0 ** -np.arange(6)) @ np.linalg.qr(rng.standard_normal((N, 6)))[0].T
    return (rng.standard_normal(N) + np.cumsum(steps * 10, axis=0)).astype(np.float32)


def create(url: str, w: np.ndarray) -> None:
    model = Vec()
    options = OPTIONS if "://" in url else None
    with TrajectoryStore.create(url, model, chunk_bytes=CHUNK_BYTES, storage_options=options) as store:
        for k, row in enumerate(w):
            with torch.no_grad():
                model.w.copy_(torch.from_numpy(row))
            store.append(model, step=k)


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Stores to copy for each race: a bare local one, one created through a ``local://`` URL, and
    a local one already holding a basis ``same`` of window C (and the Gram matrix cached)."""
    root = tmp_path_factory.mktemp("templates")
    w = walk()
    create(str(root / "bare.zarr"), w)
    create(f"local://{root / 'url.zarr'}", w)
    shutil.copytree(root / "bare.zarr", root / "pre.zarr")
    trajstore.dldr(str(root / "pre.zarr"), D, start=C[0], stop=C[1], name=NAME, block_bytes=BLOCK_BYTES, num_workers=1)
    return {"bare": root / "bare.zarr", "url": root / "url.zarr", "pre": root / "pre.zarr"}


_FRESH: dict[tuple[Any, ...], dict[str, np.ndarray]] = {}


_IN_MEMORY: dict[tuple[int, int], trajstore.Basis] = {}


def in_memory(window: tuple[int, int]) -> trajstore.Basis:
    """The in-memory reference of a window: the same float32 snapshots, in float64."""
    if window not in _IN_MEMORY:
        _IN_MEMORY[window] = trajstore.dldr(walk()[window[0]:window[1]].astype(np.float64), D)
    return _IN_MEMORY[window]


def fresh_on_store(template: Path, window: tuple[int, int], tmp: Path) -> dict[str, np.ndarray]:
    """The window computed alone on a copy of the race's template store (cached per template)."""
    key = (template, window)
    if key not in _FRESH:
        copy = tmp / f"fresh-{template.stem}-{window[0]}-{window[1]}.zarr"
        shutil.copytree(template, copy)
        basis = trajstore.dldr(str(copy), D, start=window[0], stop=window[1], name="fresh", block_bytes=BLOCK_BYTES,
                               num_workers=1)
        _FRESH[key] = {"u": basis.to_numpy(), "mean": basis.mean, "sigma": basis.singular_values}
    return _FRESH[key]


def assert_equals_fresh(u: np.ndarray, mean: np.ndarray, sigma: np.ndarray, window: tuple[int, int]) -> float:
    """U, mean and sigma equal the in-memory computation of ``window``; returns max |dU|."""
    ref = in_memory(window)
    np.testing.assert_allclose(sigma, ref.singular_values, rtol=SIGMA_RTOL)  # float64 eigenvalues of one Gram matrix
    du = float(np.abs(u.astype(np.float64) - ref.to_numpy()).max())
    assert du <= U_ATOL, (window, du)  # float32 rounding of U, no more: not rows of another window
    ref_mean = ref.mean
    assert np.abs(mean - ref_mean).max() <= MEAN_RTOL * np.abs(ref_mean).max()  # float32 rounding of the mean
    return du


def final_store(url: str, kind: str) -> Any:
    return TrajectoryStore.open(url, "r", storage_options=OPTIONS) if kind == "url" else url


Racers = list[tuple[subprocess.Popen[str], Path, tuple[int, int]]]


def spawn(url: str, windows: tuple[tuple[int, int], tuple[int, int]], overwrite: tuple[bool, bool],
          delays: tuple[float, float], tmp: Path) -> Racers:
    """Start the two racers; they import and wait for :func:`race` to say go."""
    children = []
    for k, (window, ow, delay) in enumerate(zip(windows, overwrite, delays)):
        out = tmp / f"racer{k}.npz"
        argv = [sys.executable, "-c", CHILD, url, str(window[0]), str(window[1]), str(D), str(int(ow)), str(delay),
                str(out), str(BLOCK_BYTES)]
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        children.append((child, out, window))
    return children


def race(children: Racers) -> list[dict[str, Any]]:
    """Let the two racers go and run to the end; returns their reports (with what each read back)."""
    for child, _, _ in children:  # as close to together as two writes get
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    reports = []
    for child, out, window in children:
        stdout, stderr = child.communicate(timeout=120)
        assert child.returncode == 0, stderr
        report = json.loads(stdout.strip().splitlines()[-1])
        report["asked"] = list(window)
        if report.get("read") == "ok":
            report["arrays"] = dict(np.load(out))
        reports.append(report)
    return reports


# (template, windows, overwrite) per race: the same window and different ones, with overwrite by
# none, one or both racers, over no basis or over a stored one; the last two on a local:// URL.
RACES = [
    ("bare", (A, A), (False, False)), ("bare", (A, A), (False, False)), ("bare", (B, B), (False, False)),
    ("pre", (A, A), (False, False)),
    ("bare", (A, A), (True, True)), ("pre", (A, A), (True, True)), ("pre", (C, C), (True, True)),
    ("bare", (A, A), (True, False)), ("pre", (A, A), (False, True)), ("pre", (C, C), (True, False)),
    ("bare", (A, B), (False, False)), ("bare", (A, B), (False, False)), ("bare", (A, C), (False, False)),
    ("pre", (A, B), (False, False)),
    ("bare", (A, B), (True, False)), ("bare", (C, A), (False, True)), ("pre", (B, C), (True, False)),
    ("bare", (A, B), (True, True)), ("bare", (A, C), (True, True)), ("pre", (A, B), (True, True)),
    ("url", (A, B), (False, False)), ("url", (A, C), (True, True)),
]


@pytest.mark.slow
def test_two_processes_racing_on_one_name_end_with_a_whole_basis(templates: dict[str, Path], tmp_path: Path) -> None:
    rng = random.Random(2026)
    outcomes = {"basis": 0, "error": 0, "superseded": 0}
    max_du, bitwise, orphans, overlapped = 0.0, 0, 0, 0

    def prepare(i: int) -> tuple[Path, str, tuple[float, float], Racers]:
        """Race i's store and racers (started early: they import while the race before runs)."""
        kind, windows, overwrite = RACES[i]
        tmp = tmp_path / f"race{i}"
        tmp.mkdir()
        path = tmp / "s.zarr"
        shutil.copytree(templates[kind], path)
        url = f"local://{path}" if kind == "url" else str(path)
        delays = (rng.uniform(0.0, 0.15), rng.uniform(0.0, 0.15))
        return path, url, delays, spawn(url, windows, overwrite, delays, tmp)

    upcoming = prepare(0)
    for i, (kind, windows, overwrite) in enumerate(RACES):
        path, url, delays, racers = upcoming
        for child, _, _ in racers:  # this race's racers have imported: the next ones import meanwhile
            assert child.stdout is not None and child.stdout.readline().strip() == "ready", child.stderr.read()
        if i + 1 < len(RACES):
            upcoming = prepare(i + 1)
        reports = race(racers)
        overlapped += max(r["began"] for r in reports) < min(r["ended"] for r in reports)  # ran at once
        for r in reports:
            shown = {k: v for k, v in r.items() if k != "arrays"}
            print(f"race {i} ({kind}, windows {windows}, overwrite {overwrite}, "
                  f"delays {delays[0]:.3f}/{delays[1]:.3f}): {shown}")
            assert r["outcome"] in ("basis", "error"), r  # never a raw Zarr or OS error
            if r["outcome"] == "error":
                # a documented error class, with a message saying what happened
                assert isinstance(getattr(trajstore.errors, r["error"], None), type), r
                assert issubclass(getattr(trajstore.errors, r["error"]), TrajstoreError) and r["message"], r
                outcomes["error"] += 1
                continue
            outcomes["basis"] += 1
            assert r["window"] == r["asked"]  # it returned the basis it asked for ...
            if r["read"] == "ok":  # ... equal to a fresh computation of that window
                a = r["arrays"]
                max_du = max(max_du, assert_equals_fresh(a["u"], a["mean"], a["sigma"], tuple(r["asked"])))
            else:  # or, replaced by the other racer's commit before it read it back, it says so
                assert "recomputed, replaced or deleted since it was opened" in r["read"], r
                outcomes["superseded"] += 1
        # The stored basis is one whole computation of the window it records.
        final = open_basis(url, NAME, storage_options=OPTIONS if kind == "url" else None)
        window = (final.start, final.stop)
        assert window in set(windows) | ({C} if kind == "pre" else set()), window
        u = final.to_numpy()
        max_du = max(max_du, assert_equals_fresh(u, final.mean, final.singular_values, window))
        actual = float(np.abs(u.astype(np.float64).T @ u.astype(np.float64) - np.eye(D)).max())
        assert abs(actual - final.orthonormality) <= 1e-9  # the recorded max|U^T U - I| is the real one
        if windows[0][1] == windows[1][1] and kind != "url":
            fresh = fresh_on_store(templates[kind], window, tmp_path)
            assert u.tobytes() == fresh["u"].tobytes()  # bit for bit: the same sums in the same order
            assert final.mean.tobytes() == fresh["mean"].tobytes()
            assert final.singular_values.tobytes() == fresh["sigma"].tobytes()
            bitwise += 1
        assert final.metadata["version"] in [p.name for p in (path / "bases" / NAME).glob("v-*")]
        # Versions left by a racer that committed just before the other (each read the pointer
        # before the other's write) are deleted by the next call, now that both racers are gone.
        orphans += len(list((path / "bases" / NAME).glob("v-*"))) - 1
        again = trajstore.dldr(final_store(url, kind), D, start=window[0], stop=window[1], name=NAME)
        assert again.metadata["version"] == final.metadata["version"]  # the stored basis, served as it is
        versions = sorted(p.name for p in (path / "bases" / NAME).glob("v-*"))
        assert versions == [final.metadata["version"]], versions  # no version of either racer left over
        assert not list((path / "bases" / NAME).glob("v-*/pass"))  # and no block checkpoints
    print(f"{len(RACES)} races ({overlapped} with the two computations overlapping): {outcomes['basis']} bases returned ({outcomes['superseded']} replaced before read "
          f"back), {outcomes['error']} refusals; max |U - U_fresh| = {max_du:.1e}; {bitwise} stored bases bit for bit; "
          f"{orphans} versions left for the next call")
    assert outcomes["basis"] + outcomes["error"] == 2 * len(RACES)
    assert overlapped >= len(RACES) // 2  # most were races indeed, not one call after the other


# ---------------------------------------------------------------- an opened basis after a recomputation

def test_an_opened_basis_refuses_to_read_after_its_name_was_recomputed(templates: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    shutil.copytree(templates["pre"], path)
    opened = open_basis(path, NAME)  # window C
    trajstore.dldr(str(path), D, start=A[0], stop=A[1], name=NAME, block_bytes=BLOCK_BYTES)  # another window, same name
    with pytest.raises(CorruptSnapshotError, match=r"basis 'same' was recomputed, replaced or deleted since it was "
                                                   r"opened \(the store now holds another computation of it\)"):
        opened.rows(0, 64)  # not window A's rows under window C's metadata
    with pytest.raises(CorruptSnapshotError, match="recomputed"):
        _ = opened.mean
    again = open_basis(path, NAME)
    shutil.rmtree(path / "bases" / NAME)
    with pytest.raises(CorruptSnapshotError, match=r"\(the store now holds no complete basis of that name\)"):
        again.to_numpy()  # deleted since it was opened


def test_an_opened_basis_keeps_reading_its_own_version_until_it_is_gone(templates: dict[str, Path], tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.zarr"
    shutil.copytree(templates["pre"], path)
    opened = open_basis(path, NAME)
    before = opened.to_numpy()
    monkeypatch.setattr(trajstore.basis, "delete_version", lambda *args: None)  # a deletion that never happened
    trajstore.dldr(str(path), D, start=A[0], stop=A[1], name=NAME, block_bytes=BLOCK_BYTES)
    np.testing.assert_array_equal(opened.to_numpy(), before)  # its own rows, consistent with its metadata
    assert open_basis(path, NAME).stop == A[1]  # while the store holds the new one


# ---------------------------------------------------------------- names

@pytest.mark.parametrize("bad", ["a/b", ".hid", "x" * 300, "zarr/../../x", "", "a b"])
def test_a_bad_basis_name_is_refused_before_any_work(templates: dict[str, Path], tmp_path: Path, bad: str) -> None:
    path = tmp_path / "s.zarr"
    shutil.copytree(templates["bare"], path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="basis name must match"):
        trajstore.dldr(str(path), D, name=bad)
    # nothing written: no Gram pass ran (no cache, no checkpoint), no basis folder, nothing outside
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    with pytest.raises(ValueError, match="basis name must match"):
        open_basis(path, bad)


HOSTILE = ["zarr/../../../../elsewhere/x", "a/b", ".hid", "x" * 300]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_a_hostile_stored_name_is_refused_and_nothing_is_written_outside(templates: dict[str, Path], tmp_path: Path,
                                                                         hostile: str,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from trajstore.cli import main

    folder = tmp_path / "deep" / "er"
    folder.mkdir(parents=True)
    path = folder / "s.zarr"
    shutil.copytree(templates["pre"], path)
    group = zarr.open_group(str(path), path=f"bases/{NAME}", mode="r+")
    group.update_attributes({"trajstore": {**group.attrs["trajstore"], "name": hostile}})
    with pytest.raises(InvalidStoreError, match="basis 'same'"):
        open_basis(path, NAME)  # the stored name is never taken for the basis' own
    from trajstore.verify import verify

    assert not verify(path, sources=False).ok  # verify reports it
    # The same request recomputes it (a refused basis is replaced); `trajstore basis` (for the
    # name that climbs out, as the issue's did) writes its plot under the basis' real name, next
    # to the store and nowhere else.
    before = {p for p in tmp_path.rglob("*") if not p.is_relative_to(path)}
    if hostile == HOSTILE[0]:
        argv = ["basis", str(path), "--dim", str(D), "--start", str(C[0]), "--stop", str(C[1]), "--name", NAME]
        assert main(argv) == 0
        capsys.readouterr()
        expected = {folder / f"s.{NAME}.png"}
    else:
        trajstore.dldr(str(path), D, start=C[0], stop=C[1], name=NAME, block_bytes=BLOCK_BYTES)
        expected = set()
    written = {p for p in tmp_path.rglob("*") if not p.is_relative_to(path)} - before
    assert written == expected, written
    assert open_basis(path, NAME).name == NAME


@pytest.mark.parametrize("hostile", ["x" * 300, "a b", "-lead"])
def test_a_hostile_basis_folder_name_is_refused(templates: dict[str, Path], hostile: str) -> None:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import LocalStore, MemoryStore

    local = LocalStore(templates["pre"], read_only=True)
    files = {}
    for key in trajstore._backend.sync(_keys(local)):
        files[key] = trajstore._backend.sync(local.get(key, default_buffer_prototype()))
    files[f"bases/{hostile}/zarr.json"] = files[f"bases/{NAME}/zarr.json"]  # a folder no file system here allows
    zstore = MemoryStore(store_dict=files)
    with pytest.raises(InvalidStoreError, match="does not match"):
        trajstore.basis.list_bases(zstore)
    with pytest.raises(InvalidStoreError, match="does not match"):
        open_basis(zstore, NAME)


async def _keys(store: Any) -> list[str]:
    return [k async for k in store.list()]


def test_plot_basis_refuses_a_path_that_leaves_its_folder(templates: dict[str, Path], tmp_path: Path) -> None:
    from trajstore.plots import plot_basis

    basis = open_basis(templates["pre"], NAME)
    with pytest.raises(ValueError, match="leaves the folder it names"):
        plot_basis(basis, tmp_path / "s.zarr/../../elsewhere" / "x.png")
    assert not (tmp_path.parent / "elsewhere").exists()
    basis.name = "zarr/../../x"  # a hostile name on a basis made by hand
    with pytest.raises(ValueError, match="leaves the folder it names"):
        plot_basis(basis, tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- the layout before version folders

def old_layout(path: Path, name: str) -> None:
    """Rewrite a stored basis as trajstore wrote it before version folders (format 1): its arrays
    in the basis group itself, no version named."""
    group = zarr.open_group(str(path), path=f"bases/{name}", mode="r+")
    meta = dict(group.attrs["trajstore"])
    version = meta.pop("version")
    for key in ("U", "mean", "gram"):
        shutil.move(path / "bases" / name / version / key, path / "bases" / name / key)
    shutil.rmtree(path / "bases" / name / version)
    group.update_attributes({"trajstore": {**meta, "format_version": 1}})


def test_a_basis_of_the_layout_before_versions_reads_and_is_replaced_whole(templates: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    shutil.copytree(templates["pre"], path)
    new = open_basis(path, NAME)
    u, mean = new.to_numpy(), new.mean
    old_layout(path, NAME)
    opened = open_basis(path, NAME)
    assert opened.metadata["format_version"] == 1 and opened.path == f"bases/{NAME}"
    np.testing.assert_array_equal(opened.to_numpy(), u)  # read as it is
    np.testing.assert_array_equal(opened.mean, mean)
    same = trajstore.dldr(str(path), D, start=C[0], stop=C[1], name=NAME, block_bytes=BLOCK_BYTES)
    assert same.metadata["format_version"] == 1  # the same request: served as stored, not recomputed
    again = trajstore.dldr(str(path), D, start=C[0], stop=C[1], name=NAME, block_bytes=BLOCK_BYTES, overwrite=True)
    assert again.metadata["format_version"] == trajstore.basis.FORMAT_VERSION  # recomputed into a version
    np.testing.assert_array_equal(again.to_numpy(), u)
    assert {p.name for p in (path / "bases" / NAME).iterdir()} == {"zarr.json", again.metadata["version"]}
    with pytest.raises(CorruptSnapshotError, match="recomputed, replaced or deleted since it was opened"):
        opened.to_numpy()  # its arrays were deleted after the commit: it says so
