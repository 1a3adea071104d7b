"""What each stage will cost, before any work: disk bytes, peak host and GPU memory, I/O volume.

:func:`plan` predicts, from a model's :class:`~trajstore.layout.Layout` alone, the four stages of
the method as trajstore runs them:

========== =====================================================================================
stage      what runs
========== =====================================================================================
sample     training with a :class:`~trajstore.Recorder` appending ``t`` snapshots
gram       the Gram pass of :func:`~trajstore.dldr` over all ``t`` snapshots
basis      the basis pass: U (n x d) and the mean written to the store
train      P+-BFGS steps with the basis ``resident``, ``mmap`` or ``stream`` (one row each)
========== =====================================================================================

and the official approach beside them (all snapshots stacked in one float32 array and
``sklearn.decomposition.PCA``; a state_dict written to disk before every line-search trial).

Every number is a formula of the layout, the store's chunking and a few constants of the code
(``PIECE``, ``SUB_BLOCK``, ``BASIS_SUB_BLOCK``, the append staging buffer) or of the libraries
under it, which were measured (``APPEND_WRITE_COPIES``, ``APPEND_RUNTIME_BYTES``,
``OFFICIAL_PCA_FACTOR``, ``COMPUTE_RUNTIME_BYTES``); ``trajstore bench`` measures the same stages
for real.

Host memory is the memory no file backs (anonymous and shared anonymous pages), what has to fit
in RAM: the process's baseline
(Python, torch and trajstore imported: give ``baseline_bytes``, by default this process's)
plus what the stage allocates. The resident size also counts file pages
(library code, a memory-mapped basis), which the OS can share and evict. Activation memory
comes from the tensors autograd saves for one batch (:func:`activation_bytes`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ._dask import column_block
from ._dtypes import STORAGE_DTYPES
from ._dtypes import storage_dtype as _storage_dtype
from ._linalg import BASIS_SUB_BLOCK, SUB_BLOCK
from ._localread import piece_size
from .layout import Layout
from .dldr import DEFAULT_BLOCK_BYTES
from .store import DEFAULT_CHUNK_BYTES, DEFAULT_STAGE_BYTES, _chunk_elems

if TYPE_CHECKING:
    import torch

__all__ = ["APPEND_RUNTIME_BYTES", "APPEND_WRITE_COPIES", "COMPUTE_RUNTIME_BYTES", "OFFICIAL_PCA_FACTOR", "Plan", "StagePlan", "activation_bytes", "format_plan",
           "plan", "process_rss"]

#: Memory an append holds besides its staging buffer, in units of that buffer: the chunk files
#: being written by four threads (and the allocator's per-thread arenas). Measured: a WRN-40-10
#: append to a local folder (written directly, not through Zarr's encode path).
APPEND_WRITE_COPIES = 1.6
#: Private memory the first append allocates once (lazily imported codecs, the writer threads),
#: whatever the model. Measured: ResNet-20 (n = 270k), where every other term is about 1 MiB.
APPEND_RUNTIME_BYTES = 80 * 2**20
#: Peak memory of the official approach's ``PCA(d).fit`` on a float32 (t, n) array W, in units
#: of W: the array, its centred copy, and the randomized solver's n x (d + 10) bases, for which
#: sklearn picks the randomized solver at the paper's sizes:
#: ``2 + OFFICIAL_PCA_FACTOR * (d + 10) / t``. Measured: 3.6 at t = 101, d = 40 (benchmarks/dldr.py,
#: n = 1M and 4M) and 5.2 at t = 51, d = 40 (ResNet-20), sklearn 1.9.
OFFICIAL_PCA_FACTOR = 3.2
#: Private memory the first forward and backward passes allocate once (thread pools, oneDNN and
#: allocator scratch), whatever the model. Measured: ResNet-20 on the CPU, torch 2.14, batch 8.
COMPUTE_RUNTIME_BYTES = 90 * 2**20
#: Bytes of JSON per snapshot record in the commit attribute (step, epoch, lr, time, metrics).
RECORD_BYTES = 160
#: Bytes of the fixed metadata of a store (zarr.json files).
METADATA_BYTES = 8 * 1024


@dataclass(frozen=True)
class StagePlan:
    """One stage: bytes on disk after it, peak host (RSS) and GPU memory, bytes read and written."""

    stage: str
    disk_bytes: int
    host_peak_bytes: int
    gpu_peak_bytes: int
    read_bytes: int
    write_bytes: int
    detail: dict[str, int] = field(default_factory=dict)  # the terms of host_peak_bytes above the baseline


@dataclass(frozen=True)
class Plan:
    n: int
    t: int
    d: int
    storage_dtype: str
    device: str
    baseline_bytes: int
    stages: tuple[StagePlan, ...]

    def stage(self, name: str) -> StagePlan:
        for s in self.stages:
            if s.stage == name:
                return s
        raise KeyError(f"no stage {name!r}; stages: {', '.join(s.stage for s in self.stages)}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def process_rss() -> int:
    """This process's resident memory that no file backs (``RssAnon + RssShmem``), in bytes
    (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return sum(int(line.split()[1]) * 1024 for line in f if line.startswith(("RssAnon:", "RssShmem:")))
    except OSError:
        return 0


def activation_bytes(model: torch.nn.Module, input_shape: tuple[int, ...], batch: int) -> int:
    """Bytes a training step holds for one batch: every tensor autograd saves for the backward
    pass (found with ``saved_tensors_hooks`` during a forward pass on torch's ``meta`` device, so
    nothing is allocated whatever the model's size; counted once per storage, parameters left
    out), plus the gradient buffers of the largest of them, twice (a layer's output gradient and
    its input gradient are alive together during the backward pass)."""
    import copy

    import torch

    meta = model if _on_meta(model) else copy.deepcopy(model).to("meta")
    sizes: dict[int, int] = {}
    keep = []  # keeps the saved tensors alive, so that no storage id is reused during the pass

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        keep.append(storage)
        sizes[id(storage)] = max(sizes.get(id(storage), 0), storage.nbytes())
        return t

    params = {id(p.untyped_storage()) for p in meta.parameters()}
    meta.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        meta(torch.empty((batch, *input_shape), device="meta"))
    saved = [v for k, v in sizes.items() if k not in params]
    return sum(saved) + 2 * max(saved, default=0)


def _on_meta(model: torch.nn.Module) -> bool:
    return all(p.device.type == "meta" for p in model.parameters())


def plan(layout: Layout, t: int, d: int = 40, *, storage_dtype: str = "float32", device: str = "cpu",
         chunk_bytes: int = DEFAULT_CHUNK_BYTES, workers: int | None = None, baseline_bytes: int | None = None,
         activations: int = 0, plus: bool = True, basis_dtype: str = "float32") -> Plan:
    """Predicted cost of each stage for ``t`` snapshots of ``layout`` and a ``d``-dim basis.

    Parameters
    ----------
    layout : Layout
        The model's (``Layout.from_model``; a model on the ``meta`` device will do).
    t, d : int
        Snapshots in the store (and the window), and basis dimension.
    storage_dtype : str
        Of the store.
    device : {"cpu", "cuda"}
        Where training runs: on ``cuda`` the model, its gradients and a ``resident`` basis are
        GPU memory; the host keeps the Recorder's copy and the streaming buffers.
    chunk_bytes : int
        The store's chunk size (as given to ``TrajectoryStore.create``).
    workers : int, optional
        Threads of the DLDR passes (default: the CPU count).
    baseline_bytes : int, optional
        Resident size of the process before the stage (default: this process's, now).
    activations : int
        Bytes a training step holds for its batch (:func:`activation_bytes`); 0 when no
        training step runs in the process.
    plus : bool
        P+-BFGS (one momentum buffer per parameter) rather than P-BFGS.
    basis_dtype : {"float32", "bfloat16", "float16"}
        The dtype U is held in during training (``basis.on(device, dtype=...)``): a half-precision
        U takes half the device memory and per-step reads.
    """
    if t < 2 or d < 1 or d > t - 1:
        raise ValueError(f"need t >= 2 snapshots and 1 <= d <= t - 1, got t = {t}, d = {d}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    dtype = _storage_dtype(storage_dtype)
    n, s = layout.n, dtype.itemsize
    workers = workers or os.cpu_count() or 1
    baseline = process_rss() if baseline_bytes is None else int(baseline_bytes)
    chunk = _chunk_elems(n, chunk_bytes // s)
    chunks = -(-n // chunk)
    piece = piece_size(chunk)
    state = 4 * n + layout.buffer_nbytes                      # float32 parameters and the buffers
    # ---- the store
    row_bytes = chunks * (chunk * s + 4) + layout.buffer_nbytes + 4   # Zarr pads the last chunk; crc32c each
    store_bytes = t * (row_bytes + RECORD_BYTES) + METADATA_BYTES
    stage_elems = min(chunk * max(1, DEFAULT_STAGE_BYTES // (chunk * s)), n)
    staging = stage_elems * s
    on_gpu = device == "cuda"
    optimizer = {"parameters": state, "gradients": 4 * n, "SGD momentum": 4 * n}  # on the training device
    sample_terms = {"recorder copy": state, "staging": staging, "chunk writes": int(APPEND_WRITE_COPIES * staging),
                    "runtime": APPEND_RUNTIME_BYTES}
    step = activations + (COMPUTE_RUNTIME_BYTES if activations else 0)
    if not on_gpu:
        # The first append's and the first training step's one-off allocations were measured
        # apart; in one process they are largely the same (thread pools, imports): the larger counts.
        sample_terms = {**optimizer, "training step": activations, **sample_terms,
                        "runtime": max(APPEND_RUNTIME_BYTES, COMPUTE_RUNTIME_BYTES if activations else 0)}
    sample = StagePlan("sample", store_bytes, baseline + sum(sample_terms.values()),
                       sum(optimizer.values()) + step if on_gpu else 0, 0, t * row_bytes,
                       {k: v for k, v in sample_terms.items() if v})
    # ---- the DLDR passes: one task per block of parameters, so no more busy threads than blocks
    busy = min(workers, -(-n // column_block(chunk, t, DEFAULT_BLOCK_BYTES, n)))
    reads = t * chunks * (chunk * s + 4)
    pieces = 2 * t * piece * s                                # two read buffers per worker thread
    decode = 0 if s == 4 else t * piece * 4                   # bfloat16/float16 widened to float32
    work = t * min(SUB_BLOCK, piece) * 8                      # float64 sub-block
    gram_terms = {"read buffers": busy * pieces, "decode": busy * decode, "float64 work": busy * work,
                  "partial Gram": (busy + 1) * t * t * 8}
    gram_bytes = t * t * 8 + 4
    gram = StagePlan("gram", store_bytes + gram_bytes, baseline + sum(gram_terms.values()), 0, reads, gram_bytes,
                     gram_terms)
    u_rows = piece
    u_bytes = -(-n // u_rows) * (u_rows * d * 4 + 4) + -(-n // u_rows) * (u_rows * 4 + 4) + gram_bytes
    # per thread: its read buffers, a float64 sub-block and its product (BASIS_SUB_BLOCK columns),
    # and a piece's U rows in float64 and float32; the driver: the Gram matrix, its centred copy
    # and their eigenvectors
    basis_width = min(BASIS_SUB_BLOCK, piece)
    basis_terms = {"read buffers": busy * pieces, "decode": busy * decode, "float64 work": busy * t * basis_width * 8,
                   "product": busy * (d + 1) * basis_width * 8, "U rows": busy * piece * d * 12,
                   "Gram matrices": 3 * t * t * 8}
    basis = StagePlan("basis", store_bytes + gram_bytes + u_bytes, baseline + sum(basis_terms.values()), 0, reads,
                      u_bytes, basis_terms)
    # ---- training in the subspace (P+-BFGS, restore="copy")
    stages = [sample, gram, basis]
    if basis_dtype not in STORAGE_DTYPES:
        raise ValueError(f"basis_dtype must be one of {sorted(STORAGE_DTYPES)}, got {basis_dtype!r}")
    u_item = _storage_dtype(basis_dtype).itemsize
    u = n * d * u_item                                        # U held for training
    u_stored = n * d * 4                                      # U in the store: float32
    for mode in ("resident", "mmap", "stream"):
        model_terms = {"parameters + gradients": 8 * n + layout.buffer_nbytes, "restore copy": 4 * n}
        if plus:
            model_terms["residual momentum"] = 4 * n
        host = dict(model_terms) if not on_gpu else {}
        host["training step"] = step if not on_gpu else 0
        gpu = sum(model_terms.values()) + step if on_gpu else 0
        if mode == "resident":
            if on_gpu:
                gpu += u
            else:
                host["basis"] = u
        elif mode == "mmap":
            pass  # U's mapped file pages: in RSS once touched, not private memory; the OS may evict them
        else:
            host["chunk buffers"] = min(n, u_rows) * d * (4 + u_item)  # a chunk read (float32), its staging copy
        per_step = 0 if mode == "resident" else 3 * u_stored  # project, lift, residual lift (+1 per extra trial)
        stages.append(StagePlan(f"train ({mode})", store_bytes + gram_bytes + u_bytes,
                                baseline + sum(host.values()), gpu, u_stored if mode == "resident" else per_step, 0,
                                {k: v for k, v in host.items() if v}))
    # ---- the official approach
    w = t * n * 4
    official = {"snapshots array and PCA": int((2 + OFFICIAL_PCA_FACTOR * (d + 10) / t) * w)}
    stages.append(StagePlan("official basis", t * 4 * n, baseline + sum(official.values()), 0, t * 4 * n, 0, official))
    return Plan(n, t, d, dtype.name, device, baseline, tuple(stages))


def format_plan(p: Plan) -> str:
    """The plan as a table, in GiB (disk, host peak, GPU peak) and GB (I/O)."""
    g = 2**30
    lines = [f"n = {p.n:,} parameters, t = {p.t} snapshots ({p.storage_dtype}), d = {p.d}, training on {p.device}; "
             f"host baseline {p.baseline_bytes / g:.2f} GiB",
             f"{'stage':<16} {'disk GiB':>9} {'host peak GiB':>14} {'GPU peak GiB':>13} {'read GB':>9} {'written GB':>11}"]
    for s in p.stages:
        gpu = f"{s.gpu_peak_bytes / g:.3f}" if s.gpu_peak_bytes else "-"
        lines.append(f"{s.stage:<16} {s.disk_bytes / g:>9.3f} {s.host_peak_bytes / g:>14.3f} {gpu:>13} "
                     f"{s.read_bytes / 1e9:>9.3f} {s.write_bytes / 1e9:>11.3f}")
    lines.append("train: per-step reads for mmap/stream (U read three times: project, lift, residual lift; "
                 "one more lift per extra line-search trial). 'official basis': all snapshots in RAM + sklearn PCA.")
    return "\n".join(lines)

