"""P-SGD: SGD with momentum on the d coordinates of a DLDR subspace.

``v = momentum * v + P^T g``, ``w -= lr * P v`` (the paper's subspace SGD baseline).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .distributed import check_step, group_of, mean_over_ranks
from .projection import bind_basis

__all__ = ["PSGD"]


class PSGD(torch.optim.Optimizer):
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
        if len(self.param_groups) != 1:
            raise ValueError("PSGD takes one parameter group (the whole model, in layout order)")
        self._params: list[torch.Tensor] = self.param_groups[0]["params"]
        self._basis = bind_basis(self._params, basis)
        self._constructed = True
        self._group = group_of(process_group)
        self._check_ranks = bool(check_ranks)
        self._replicated = not self._basis.holds_shard_only(self._params)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused once constructed: a second group would never move."""
        if getattr(self, "_constructed", False):
            raise ValueError("PSGD optimizes one parameter group, the parameters its basis was made from; "
                             "a second group would never move (make another optimizer for other parameters)")
        super().add_param_group(param_group)

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
