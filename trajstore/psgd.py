"""P-SGD: SGD with momentum on the d coordinates of a DLDR subspace.

``v = momentum * v + P^T g``, ``w -= lr * P v`` (the paper's subspace SGD baseline).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .distributed import check_step, mean_over_ranks
from .projection import SubspaceOptimizer

__all__ = ["PSGD"]


class PSGD(SubspaceOptimizer):
    """SGD with momentum restricted to the span of a basis.

    Parameters
    ----------
    params : iterable of Tensor
        The model's parameters in ``model.parameters()`` order (the store's layout order).
    basis : Basis or DeviceBasis
    lr : float
        Step size, > 0.
    momentum : float
        In [0, 1).
    process_group : ProcessGroup, optional
        Under torch.distributed (the default group when one is initialized) the loss returned is
        the mean over the ranks; gradients must arrive averaged (``DistributedDataParallel``).
    check_ranks : bool
        Under torch.distributed, check at every step that the ranks agree (as
        :class:`~trajstore.PBFGS` does) and raise
        :class:`~trajstore.distributed.RankMismatchError` if not.
    """

    def __init__(self, params: Iterable[torch.Tensor], basis: Any, lr: float, momentum: float = 0.9, *,
                 process_group: Any = None, check_ranks: bool = True) -> None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        super().__init__(params, {"lr": lr, "momentum": momentum})
        self._bind(basis, process_group, check_ranks)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if self._group is not None:
                value = mean_over_ranks(float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss), self._group)
                loss = torch.tensor(value, dtype=loss.dtype, device=loss.device) if isinstance(loss, torch.Tensor) \
                    else torch.tensor(value, dtype=torch.float64)
        group = self.param_groups[0]
        state = self.state[self._params[0]]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        g = self._basis.project(grads).to(self._params[0].dtype)
        if self._check_ranks:
            check_step(self._group, g, grads, self._params, self._replicated)
        if "coord_momentum" not in state:
            state["coord_momentum"] = torch.zeros_like(g)
        v = state["coord_momentum"].mul_(group["momentum"]).add_(g)
        self._basis.lift(v, out=self._params, alpha=-group["lr"])
        return loss
