"""Data sets of the pipelines: local generation, fixed splits, label noise done right, CIFAR from
a local folder (a tiny one written here in CIFAR's own format) and a clear error without one."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_cifar10
from pipelines.data import CIFAR_STATS, label_noise, load


def test_label_noise_changes_exactly_the_chosen_fraction_to_other_classes() -> None:
    y = np.random.default_rng(1).integers(0, 10, 5000)
    noisy, changed = label_noise(y, 0.3, 10, seed=7)
    assert changed.sum() == 1500  # exactly round(fraction * N)
    assert np.all(noisy[changed] != y[changed])  # a new label is never the true one
    assert np.all(noisy[~changed] == y[~changed])  # the rest are untouched
    assert set(np.unique(noisy)) <= set(range(10))  # drawn among the data set's own classes
    # uniform over the 9 other classes: each offset 1..9 about 1/9 of the changed labels
    offsets = np.bincount((noisy[changed] - y[changed]) % 10, minlength=10)[1:]
    assert offsets.min() > 1500 / 9 * 0.7
    again, _ = label_noise(y, 0.3, 10, seed=7)
    other, _ = label_noise(y, 0.3, 10, seed=8)
    assert np.array_equal(again, noisy) and not np.array_equal(other, noisy)  # seeded
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\], got 1.5"):
        label_noise(y, 1.5, 10, 0)


def test_digits_split_and_noise_mask() -> None:
    data = load("digits", label_noise_fraction=0.1, seed=3)
    assert (len(data.train), len(data.test)) == (1437, 360) and data.input_shape == (64,)
    assert data.noisy is not None and data.noisy.sum() == round(0.1 * 1437)
    x, _ = data.train[0]
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1


@pytest.mark.slow
def test_mnist1d_is_generated_locally_and_deterministic() -> None:
    a, b = load("mnist1d"), load("mnist1d")
    assert (len(a.train), len(a.test), a.input_shape, a.num_classes) == (4000, 1000, (40,), 10)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])  # same data every time


def test_cifar10_from_a_local_folder(tmp_path: Path) -> None:
    test_images = write_cifar10(tmp_path)
    data = load("cifar10", root=str(tmp_path), augment=False, label_noise_fraction=0.5, seed=1)
    assert (len(data.train), len(data.test), data.num_classes) == (20, 10, 10)
    x, _ = data.test[0]
    mean, std = CIFAR_STATS["cifar10"]
    expected = (torch.tensor(test_images[0], dtype=torch.float32).permute(2, 0, 1) / 255
                - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(x, expected)  # per-channel CIFAR statistics applied
    assert data.noisy is not None and data.noisy.sum() == 10


class _Exploit:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (eval, ("__import__('pathlib').Path('PWNED').touch()",))


def test_a_cifar_file_that_would_run_code_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({"data": _Exploit(), "labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.eval"):
        load("cifar10", root=str(tmp_path))
    assert not (tmp_path / "PWNED").exists()  # nothing ran


def test_missing_cifar_names_the_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py/ with data_batch_1"):
        load("cifar10", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cifar-100-python/ with train, test and meta"):
        load("cifar100", root=None)
    with pytest.raises(ValueError, match="unknown data set 'svhn'"):
        load("svhn")


def test_a_cifar_file_with_an_object_array_is_refused(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    objects = np.array([1, "a", None], dtype=object)  # elements unpickled from the stream itself
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": objects, "labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="refusing an array of dtype object"):
        load("cifar10", root=str(tmp_path))
