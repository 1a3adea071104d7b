"""Hugging Face transformers (real ``Trainer``, CPU, a tiny BERT built from a config, no hub):
the recording callback and P-BFGS / P+-BFGS through :class:`SubspaceTrainer`.
"""

from __future__ import annotations

import glob
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from trajstore import PBFGS, TrajectoryStore, dldr, open_basis  # noqa: E402
from trajstore.integrations.transformers import (  # noqa: E402
    ResumeMismatchError, SubspaceTrainer, TrajectoryCallback)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
transformers.utils.logging.set_verbosity_error()

STEPS_PER_EPOCH = 4  # 64 examples, batches of 16


class Tokens(torch.utils.data.Dataset):
    """Sequences of 12 tokens; the label says whether the first token is above 10."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        self.x = torch.randint(1, 20, (n, 12), generator=torch.Generator().manual_seed(seed))
        self.y = (self.x[:, 0] > 10).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": self.y[i]}


def bert(seed: int = 0, dropout: float = 0.1) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2,
                                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return transformers.BertForSequenceClassification(config)


def arguments(folder: Path, **kw: Any) -> Any:
    options = dict(output_dir=str(folder), per_device_train_batch_size=16, num_train_epochs=3, report_to=[],
                   use_cpu=True, save_strategy="no", disable_tqdm=True, logging_strategy="no", seed=0,
                   learning_rate=1e-3, dataloader_num_workers=0)
    options.update(kw)
    return transformers.TrainingArguments(**options)


def loss_on(model: torch.nn.Module, data: Tokens) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=data.x, attention_mask=torch.ones_like(data.x), labels=data.y).loss)


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def contents(path: Path) -> tuple[list[Any], np.ndarray]:
    with TrajectoryStore.open(path) as store:
        return [(r["step"], r["epoch"]) for r in store.records], np.stack([store.snapshot(i) for i in range(len(store))])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """An AdamW run of 3 epochs recorded every 2 steps, with the basis of its trajectory."""
    folder = tmp_path_factory.mktemp("hf")
    model = bert()
    init = flat(model)
    transformers.Trainer(model, arguments(folder), train_dataset=Tokens(),
                         callbacks=[TrajectoryCallback(folder / "t.zarr", every_n_steps=2)]).train()
    dldr(folder / "t.zarr", 5, name="b")
    return folder / "t.zarr", init, flat(model)


def test_callback_records_the_expected_snapshots(recorded: tuple[Path, torch.Tensor, torch.Tensor]) -> None:
    path, init, final = recorded
    meta, rows = contents(path)
    assert meta == [(2 * k, 2 * k / STEPS_PER_EPOCH) for k in range(7)]
    assert np.array_equal(rows[0], init.numpy()) and np.array_equal(rows[-1], final.numpy())
    assert len(np.unique(rows, axis=0)) == 7


def test_every_epoch_with_gradient_accumulation(tmp_path: Path) -> None:
    """Batches of 8, two accumulated per optimizer step: 4 steps per epoch, as above."""
    model = bert()
    transformers.Trainer(model, arguments(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                                          num_train_epochs=2), train_dataset=Tokens(),
                         callbacks=[TrajectoryCallback(tmp_path / "e.zarr", every_n_epochs=1),
                                    TrajectoryCallback(tmp_path / "s.zarr", every_n_steps=3)]).train()
    assert contents(tmp_path / "e.zarr")[0] == [(0, 0), (4, 1.0), (8, 2.0)]
    assert [s for s, _ in contents(tmp_path / "s.zarr")[0]] == [0, 3, 6]
    assert np.array_equal(contents(tmp_path / "e.zarr")[1][-1], flat(model).numpy())


class InOrder(SubspaceTrainer):
    """The batches in dataset order, so that a plain loop can take the same ones."""

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> torch.utils.data.Sampler:
        return torch.utils.data.SequentialSampler(self.train_dataset)


def test_pbfgs_through_the_trainer_equals_a_plain_loop(recorded: tuple[Path, torch.Tensor, torch.Tensor],
                                                       tmp_path: Path) -> None:
    """No dropout, batches in order: the Trainer path and the README's closure loop end bit-identical;
    one backward per step (a gradient hook counts them); the move stays in span(U) (P-BFGS)."""
    basis = open_basis(recorded[0], "b")
    backwards = {"plain": 0, "trainer": 0}
    models = {}
    for key in backwards:
        models[key] = bert(dropout=0.0)
        torch.nn.utils.vector_to_parameters(recorded[1].clone(), models[key].parameters())
        head = list(models[key].parameters())[-1]
        head.register_hook(lambda g, key=key: backwards.__setitem__(key, backwards[key] + 1))
    plain, data = models["plain"], Tokens()
    opt = PBFGS(plain.parameters(), basis)
    for _ in range(2):
        for a in range(0, len(data), 16):
            batch = {k: torch.stack([data[i][k] for i in range(a, a + 16)]) for k in ("input_ids", "attention_mask", "labels")}

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = plain(**batch).loss
                if torch.is_grad_enabled():
                    loss.backward()
                return loss

            opt.step(closure)
    model = models["trainer"]
    through = PBFGS(model.parameters(), basis)
    trainer = InOrder(model, arguments(tmp_path, num_train_epochs=2, lr_scheduler_type="constant"),
                      train_dataset=data, optimizers=(through, None))
    trainer.train()
    steps = 2 * STEPS_PER_EPOCH
    assert trainer.state.global_step == through.stats["steps"] == steps
    assert sum(through.stats["trials"]) > steps
    assert backwards == {"plain": steps, "trainer": steps}
    assert torch.equal(flat(model), flat(plain))
    move = flat(model) - recorded[1]
    u = torch.from_numpy(basis.to_numpy()).double()
    move = move.double()
    outside = move - u @ (u.T @ move)
    assert float(move.norm()) > 0 and float(outside.norm()) < 1e-4 * float(move.norm())


def test_p_plus_bfgs_trains_a_tiny_model(recorded: tuple[Path, torch.Tensor, torch.Tensor], tmp_path: Path) -> None:
    model = bert()
    torch.nn.utils.vector_to_parameters(recorded[1].clone(), model.parameters())
    before = loss_on(model, Tokens())
    opt = PBFGS(model.parameters(), open_basis(recorded[0], "b"), plus=True)
    trainer = SubspaceTrainer(model, arguments(tmp_path, lr_scheduler_type="constant"), train_dataset=Tokens(),
                              optimizers=(opt, None), callbacks=[TrajectoryCallback(tmp_path / "p.zarr",
                                                                                    every_n_epochs=1)])
    trainer.train()
    assert opt.stats["steps"] == trainer.state.global_step == 3 * STEPS_PER_EPOCH
    assert loss_on(model, Tokens()) < 0.5 * before
    meta, rows = contents(tmp_path / "p.zarr")
    assert meta == [(0, 0), (4, 1.0), (8, 2.0), (12, 3.0)] and np.array_equal(rows[-1], flat(model).numpy())


def test_subspace_trainer_refuses_gradient_accumulation(recorded: tuple[Path, torch.Tensor, torch.Tensor],
                                                        tmp_path: Path) -> None:
    model = bert()
    opt = PBFGS(model.parameters(), open_basis(recorded[0], "b"))
    trainer = SubspaceTrainer(model, arguments(tmp_path, gradient_accumulation_steps=2), train_dataset=Tokens(),
                              optimizers=(opt, None))
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be 1"):
        trainer.train()


def test_subspace_trainer_with_another_optimizer_is_the_trainer(tmp_path: Path) -> None:
    a, b = bert(), bert()
    transformers.Trainer(a, arguments(tmp_path / "a", num_train_epochs=1), train_dataset=Tokens()).train()
    SubspaceTrainer(b, arguments(tmp_path / "b", num_train_epochs=1), train_dataset=Tokens()).train()
    assert torch.equal(flat(a), flat(b)) and not torch.equal(flat(a), flat(bert()))


class Crash(transformers.TrainerCallback):
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 7:
            raise ArithmeticError("crash")


def train(folder: Path, *, crash: bool = False, resume: str | None = None, seed: int = 0) -> None:
    callbacks = [TrajectoryCallback(folder / "t.zarr", every_n_steps=2)] + ([Crash()] if crash else [])
    trainer = transformers.Trainer(bert(), arguments(folder, save_strategy="steps", save_steps=3, seed=seed),
                                   train_dataset=Tokens(), callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)


def latest(folder: Path) -> str:
    return max(glob.glob(str(folder / "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]))


@pytest.mark.slow
def test_resumed_training_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """Checkpoints every 3 steps, a crash at step 7. Resuming from the step-3 checkpoint (mid-epoch)
    the run reaches steps 4 and 6 again, whose snapshots are in the store already: they are
    compared, not written twice, and recording goes on at step 8."""
    train(tmp_path / "whole")
    with pytest.raises(ArithmeticError):
        train(tmp_path / "cut", crash=True)
    assert [s for s, _ in contents(tmp_path / "cut" / "t.zarr")[0]] == [0, 2, 4, 6]
    train(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-3"))
    whole, cut = contents(tmp_path / "whole" / "t.zarr"), contents(tmp_path / "cut" / "t.zarr")
    assert whole[0] == cut[0] and np.array_equal(whole[1], cut[1])


@pytest.mark.slow
def test_resumed_training_that_diverges_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArithmeticError):
        train(tmp_path, crash=True)
    with pytest.raises(ResumeMismatchError, match="snapshot 2 was recorded at step 4"):
        train(tmp_path, resume=str(tmp_path / "checkpoint-3"), seed=1)  # another data order from step 3 on
