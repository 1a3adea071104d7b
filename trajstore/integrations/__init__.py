"""Adapters to the training stacks users already have.

- :mod:`trajstore.integrations.lightning`: a recording callback for ``Trainer.fit`` and
  :func:`~trajstore.integrations.lightning.line_search_step` for P-BFGS in a LightningModule
  (``pip install 'trajstore[lightning]'``).
- :mod:`trajstore.integrations.transformers`: a recording ``TrainerCallback`` and
  :class:`~trajstore.integrations.transformers.SubspaceTrainer`, a Hugging Face ``Trainer`` that
  steps P-BFGS with a proper closure (``pip install 'trajstore[transformers]'``).

Each module imports its framework; this package imports none.
"""

from ._recording import ResumeMismatchError, SnapshotSchedule

__all__ = ["ResumeMismatchError", "SnapshotSchedule"]
