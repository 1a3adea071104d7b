"""``trajstore plan``'s arithmetic against hand-computed cases and against real stores; the bench
harness's floor arithmetic. No timing is asserted here (benchmarks/ measures)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pipelines.bench import floor_bounds
from trajstore import TrajectoryStore, dldr
from trajstore.layout import Layout
from trajstore.plan import (APPEND_RUNTIME_BYTES, APPEND_WRITE_COPIES, COMPUTE_RUNTIME_BYTES, OFFICIAL_PCA_FACTOR,
                            RECORD_BYTES, activation_bytes, format_plan, plan)


def layout_of(*shapes: tuple[int, ...]) -> Layout:
    model = nn.Module()
    model.ps = nn.ParameterList(nn.Parameter(torch.zeros(s)) for s in shapes)
    return Layout.from_model(model)


def test_small_model_by_hand() -> None:
    # n = 1000 values: one chunk of 1000 per snapshot (a store chunks at most 1M float32 values,
    # never more than the model), the streaming piece is the whole chunk, one block.
    p = plan(layout_of((1000,)), t=11, d=3, workers=2, baseline_bytes=0)
    row = 1000 * 4 + 4 + 0 + 4                      # values + crc32c; empty buffers chunk + crc32c
    store = 11 * (row + RECORD_BYTES) + 8192
    assert p.stage("sample").disk_bytes == store
    assert p.stage("sample").write_bytes == 11 * row
    staging = 1000 * 4
    # training state (parameters, gradients, SGD momentum), the Recorder's copy, the staging buffer,
    # the chunks being written, and what a first append allocates once
    assert p.stage("sample").host_peak_bytes == (3 * 4000 + 4000 + staging + int(APPEND_WRITE_COPIES * staging)
                                                 + APPEND_RUNTIME_BYTES)
    gram = p.stage("gram")
    assert gram.read_bytes == 11 * (4000 + 4)
    # one busy thread (one block): two (11, 1000) float32 read buffers, an (11, 1000) float64
    # sub-block, and the partial and total 11 x 11 float64 Gram matrices
    assert gram.host_peak_bytes == 2 * 11 * 1000 * 4 + 11 * 1000 * 8 + 2 * 11 * 11 * 8
    assert gram.disk_bytes == store + 11 * 11 * 8 + 4
    basis = p.stage("basis")
    u, mean, basis_gram = 1000 * 3 * 4 + 4, 1000 * 4 + 4, 11 * 11 * 8 + 4
    assert basis.write_bytes == u + mean + basis_gram
    # the read buffers, an (11, 1000) float64 sub-block and its (4, 1000) product, U's rows in float64
    # and float32, and the driver's Gram matrix, centred copy and eigenvectors
    assert basis.host_peak_bytes == 2 * 11 * 1000 * 4 + 11 * 1000 * 8 + 4 * 1000 * 8 + 1000 * 3 * (8 + 4) + 3 * 11 * 11 * 8
    # P+-BFGS on the CPU, no training step in the plan (activations = 0): parameters, gradients,
    # the restore copy, the residual momentum, and U when resident
    assert p.stage("train (resident)").host_peak_bytes == 4 * 4000 + 12000
    assert p.stage("train (mmap)").host_peak_bytes == 4 * 4000
    assert p.stage("train (mmap)").read_bytes == 3 * 12000  # project, lift, residual lift per step
    w = 11 * 1000 * 4
    assert p.stage("official basis").host_peak_bytes == int((2 + OFFICIAL_PCA_FACTOR * 13 / 11) * w)


def test_half_precision_stores_decode_into_float32() -> None:
    p32 = plan(layout_of((1000,)), t=11, d=3, workers=1, baseline_bytes=0)
    p16 = plan(layout_of((1000,)), t=11, d=3, workers=1, baseline_bytes=0, storage_dtype="bfloat16")
    assert p16.stage("sample").write_bytes == 11 * (1000 * 2 + 4 + 4)
    # read buffers halve, and a float32 decode buffer of one piece appears
    assert p32.stage("gram").host_peak_bytes - p16.stage("gram").host_peak_bytes == 2 * 11 * 1000 * 2 - 11 * 1000 * 4


def test_large_model_uses_every_worker_and_bounded_pieces() -> None:
    n = 64 * 2**20  # 64M values: 4 MiB chunks (1M values), 64 chunks, pieces of 65,536
    p = plan(layout_of((n,)), t=101, d=40, workers=4, baseline_bytes=0)
    gram = p.stage("gram")
    per_thread = 2 * 101 * 65536 * 4 + 101 * 65536 * 8
    assert gram.host_peak_bytes == 4 * per_thread + 5 * 101 * 101 * 8  # flat in n
    assert gram.read_bytes == 101 * 64 * (2**20 * 4 + 4)
    assert p.stage("official basis").host_peak_bytes > 3.5 * 101 * n * 4  # the paper's sizes: ~3.6 W


def test_gpu_training_moves_the_model_and_a_resident_basis_to_the_device() -> None:
    lay = layout_of((1000,), (24,))
    p = plan(lay, t=11, d=3, device="cuda", baseline_bytes=0, activations=1000)
    n = 1024
    step = 1000 + COMPUTE_RUNTIME_BYTES
    assert p.stage("sample").gpu_peak_bytes == 3 * 4 * n + step
    assert p.stage("train (resident)").gpu_peak_bytes == 4 * 4 * n + step + n * 3 * 4
    assert p.stage("train (stream)").gpu_peak_bytes == 4 * 4 * n + step
    assert p.stage("train (resident)").host_peak_bytes == 0  # all of it on the device
    assert "GPU peak" in format_plan(p)


@pytest.mark.parametrize(("kwargs", "match"), [({"t": 1, "d": 1}, "t >= 2"), ({"t": 5, "d": 5}, "d <= t - 1"),
                                               ({"t": 5, "d": 2, "device": "tpu"}, "device must be")])
def test_bad_requests_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan(layout_of((10,)), **kwargs)


def test_activation_bytes_counts_what_autograd_saves() -> None:
    # The first Linear saves its input; ReLU saves its output, which the second Linear saves too
    # (one storage, counted once); the pre-activation is not saved. Weights are not counted.
    saved = 4 * 10 * 4 + 4 * 20 * 4
    for relu in (nn.ReLU(), nn.ReLU(inplace=True)):
        model = nn.Sequential(nn.Linear(10, 20), relu, nn.Linear(20, 5))
        assert activation_bytes(model, (10,), 4) == saved + 2 * 4 * 20 * 4  # + gradients of the largest, twice
    assert next(model.parameters()).device.type == "cpu"  # measured on a copy, on the meta device


def test_disk_bytes_match_real_stores(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 700), nn.BatchNorm1d(700), nn.Linear(700, 100))  # 281,500 values
    path = tmp_path / "t.zarr"
    with TrajectoryStore.create(path, model) as store:
        for step in range(12):
            with torch.no_grad():
                for q in model.parameters():
                    q.add_(0.01 * torch.randn_like(q))
            store.append(model, step=step, epoch=step, lr=0.1)
    p = plan(Layout.from_model(model), t=12, d=5, baseline_bytes=0)

    def du() -> int:
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    # within 2%: the estimate of JSON metadata (records, zarr.json) is the only approximate term
    assert du() == pytest.approx(p.stage("sample").disk_bytes, rel=0.02)
    dldr(path, 5)
    assert du() == pytest.approx(p.stage("basis").disk_bytes, rel=0.02)


def test_floor_bounds_by_hand() -> None:
    b = floor_bounds(write_bytes=10e9, read_bytes=20e9, basis_write_bytes=1e9, gram_flops=4e12, basis_flops=1e12,
                     write_Bps=0.5e9, read_Bps=2e9, flops=100e9)
    assert b["sample"] == pytest.approx(20.0)     # 10 GB at 0.5 GB/s
    assert b["gram"] == pytest.approx(40.0)       # arithmetic (4e12 / 1e11) outlasts the read (10 s)
    assert b["basis"] == pytest.approx(12.0)      # read 20 GB at 2 GB/s + write 1 GB at 0.5 GB/s > 10 s of arithmetic
