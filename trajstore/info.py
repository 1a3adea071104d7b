"""What a store holds, as a JSON-ready dict and as text (``trajstore info``)."""

from __future__ import annotations

from typing import Any

from . import _backend
from ._backend import StoreLike, describe
from .basis import BASES_ROOT, list_bases, validate_meta
from .errors import InvalidStoreError
from .store import TrajectoryStore

__all__ = ["format_info", "store_info"]


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    raise AssertionError("unreachable")


def store_info(url: StoreLike, *, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every trajectory of the store: n, t, layout size, dtype, bytes stored, per-snapshot records;
    and every basis. ``storage_options`` go to the URL's fsspec file system (as for
    :meth:`TrajectoryStore.open`); a store that cannot be reached raises StoreUnreachableError."""
    trajectories = []
    for name in TrajectoryStore.list_trajectories(url, storage_options=storage_options):
        store = TrajectoryStore.open(url, "r", trajectory=name, storage_options=storage_options)
        layout = store.layout
        trajectories.append({
            "name": name,
            "n": store.n,
            "t": len(store),
            "parameters": len(layout.params),
            "buffers": len(layout.buffers),
            "buffer_bytes": layout.buffer_nbytes,
            "fingerprint": layout.fingerprint,
            "storage_dtype": store.storage_dtype,
            "chunk_elems": store.chunk_elems,
            "bytes_stored": store.nbytes_stored(),
            "attrs": store.attrs,
            "gram": _gram_info(store),
            "snapshots": [{k: r.get(k) for k in ("step", "epoch", "lr", "metrics", "time")} for r in store.records],
        })
    zstore = _backend.open_zarr_store(url, read_only=True, storage_options=storage_options)
    return {"store": describe(url), "trajectories": trajectories, "bases": _bases_info(zstore)}


def _gram_info(store: TrajectoryStore) -> dict[str, Any] | None:
    try:
        group = _backend.open_group(store.zarr_store, f"{store.prefix}/gram", "r")
    except (FileNotFoundError, InvalidStoreError):  # none, or damaged: the next dldr recomputes it
        return None
    doc = group.attrs.get("trajstore")
    return {"count": doc.get("count"), "reference": doc.get("reference")} if isinstance(doc, dict) else None


def _bases_info(zstore: Any) -> list[dict[str, Any]]:
    out = []
    for name in list_bases(zstore):
        group = _backend.open_group(zstore, f"{BASES_ROOT}/{name}", "r")
        meta = validate_meta(group.attrs.get("trajstore"), name)  # numbers that print as numbers
        evr = meta["explained_variance_ratio"]
        out.append({"name": name, "trajectory": meta.get("trajectory"), "start": meta.get("start"),
                    "stop": meta.get("stop"), "d": meta.get("d"), "n": meta.get("n"),
                    "explained": float(sum(evr)) if isinstance(evr, list) else None,
                    "orthonormality": meta.get("orthonormality"), "complete": bool(meta.get("complete")),
                    "bytes_stored": _backend.size_of(zstore, f"{BASES_ROOT}/{name}")})
    return out


def format_info(info: dict[str, Any], *, max_rows: int = 12) -> str:
    lines = [f"store {info['store']}"]
    if not info["trajectories"]:
        lines.append("  (no trajectories)")
    for tr in info["trajectories"]:
        lines.append(
            f"  trajectory {tr['name']!r}: n = {tr['n']:,} parameters in {tr['parameters']} tensors "
            f"(+{tr['buffers']} buffers, {tr['buffer_bytes']:,} B), t = {tr['t']} snapshots, "
            f"{tr['storage_dtype']}, {_human(tr['bytes_stored'])} stored, layout {tr['fingerprint']}"
        )
        if tr.get("gram"):
            lines.append(f"    cached Gram matrix: snapshots [0, {tr['gram']['count']}) relative to snapshot {tr['gram']['reference']}")
        snaps = tr["snapshots"]
        if not snaps:
            continue
        metric_names = sorted({k for s in snaps for k in s["metrics"]})
        header = ["#", "step", "epoch", "lr", *metric_names]
        rows = []
        shown = list(enumerate(snaps))
        if len(shown) > max_rows:
            shown = shown[: max_rows // 2] + [(-1, None)] + shown[-(max_rows // 2):]
        for i, s in shown:
            if s is None:
                rows.append(["..."] + [""] * (len(header) - 1))
                continue
            cells = [str(i), _fmt(s["step"]), _fmt(s["epoch"]), _fmt(s["lr"])]
            cells += [_fmt(s["metrics"].get(m)) for m in metric_names]
            rows.append(cells)
        widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(header)]
        lines.append("    " + "  ".join(h.rjust(w) for h, w in zip(header, widths)))
        lines.extend("    " + "  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)
    for b in info.get("bases", []):
        state = "" if b["complete"] else " (INCOMPLETE)"
        lines.append(
            f"  basis {b['name']!r}{state}: trajectory {b['trajectory']!r} window [{b['start']}, {b['stop']}), "
            f"d = {b['d']}, n = {b['n']:,}, explained {b['explained']:.4f}, max|UᵀU-I| = {b['orthonormality']:.1e}, "
            f"{_human(b['bytes_stored'])}"
        )
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
