"""P-BFGS and P+-BFGS (Li et al., Train Deep Neural Networks in 40-D Subspaces, Algorithm 2).

BFGS on the d coordinates of a DLDR subspace: projected gradient ``g~ = P^T g``, the inverse-Hessian
update of eq. (13) from ``B_0 = I`` (skipped, and counted, when ``y^T s <= eps``), and Armijo
backtracking (eq. 14) on the same mini-batch from ``alpha = 1``. P+-BFGS also moves the residual
``g - P g~`` by SGD with momentum.

The numerics (:func:`bfgs_update`, :func:`armijo_accepts`) are pure functions on tensors; the
optimizer does the parameter plumbing, like ``torch.optim.LBFGS``. ``official=True`` takes the step
of the official code (nblt/DLDR ``train_pbfgs.py``) instead of the paper's, where they differ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .distributed import check_step, rank_and_world, sum_over_ranks
from .errors import TrajstoreError
from .projection import SubspaceOptimizer

__all__ = ["ClosureError", "PBFGS", "armijo_accepts", "bfgs_update"]

PAPER_BETA, OFFICIAL_BETA = 0.55, 0.4  # the paper's backtracking factor; train_pbfgs.py overwrites it
PAPER_EPS, OFFICIAL_EPS = 1e-10, 1e-20

_CLOSURE_FIX = (
    "a line-search trial calls the closure under torch.no_grad(); make the closure call backward()\n"
    "only when gradients are enabled:\n\n"
    "    def closure():\n"
    "        optimizer.zero_grad()\n"
    "        loss = criterion(model(x), y)\n"
    "        if torch.is_grad_enabled():\n"
    "            loss.backward()\n"
    "        return loss\n"
)


class ClosureError(TrajstoreError, TypeError):
    """The closure does not follow the contract of line-search optimizers."""


def bfgs_update(b: torch.Tensor, s: torch.Tensor, y: torch.Tensor, eps: float) -> tuple[torch.Tensor, bool]:
    """Inverse-Hessian BFGS update, paper eq. (13): ``(I - rho s y^T) B (I - rho y s^T) + rho s s^T``.

    Returns ``(B, updated)``; when ``y^T s <= eps`` (curvature condition fails) B is returned
    unchanged and ``updated`` is False.
    """
    ys = torch.dot(y, s)
    if not bool(ys > eps):
        return b, False
    rho = 1.0 / ys
    by = b @ y
    # Expanded form of eq. (13), one rank-2 correction (B symmetric):
    # B - rho (s (B y)^T + (B y) s^T) + (rho^2 y^T B y + rho) s s^T
    b = b - rho * (torch.outer(s, by) + torch.outer(by, s)) + (rho * rho * torch.dot(y, by) + rho) * torch.outer(s, s)
    return b, True


def armijo_accepts(loss0: float, trial: float, alpha: float, slope: float, c: float, *, strict: bool = False) -> bool:
    """Armijo's sufficient decrease, paper eq. (14): ``f(x + alpha p) <= f(x) + c alpha g~^T p``
    (``<`` with ``strict``, as the official code tests it)."""
    bound = loss0 + c * alpha * slope
    return trial < bound if strict else trial <= bound


def _rng_state(devices: set[torch.device]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    cuda = {d.index or 0: torch.cuda.get_rng_state(d) for d in devices if d.type == "cuda"}
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, dict[int, torch.Tensor]]) -> None:
    torch.set_rng_state(state[0])
    for index, s in state[1].items():
        torch.cuda.set_rng_state(s, index)


class PBFGS(SubspaceOptimizer):
    """BFGS in the subspace spanned by a DLDR basis (P-BFGS; P+-BFGS with ``plus=True``).

    Parameters
    ----------
    params : iterable of Tensor
        The model's parameters, in ``model.parameters()`` order (the store's layout order). For a
        basis of a stored trajectory their shapes are checked, in order, against its layout (the
        first mismatching tensor is named): a reversed list or another model of the same size is
        refused. One parameter group; ``add_param_group`` is refused.
    basis : Basis or DeviceBasis
        The subspace; a :class:`Basis` is placed on the parameters' device with ``mode="auto"``.
    lr : float
        Scales every step, so that torch's learning-rate schedulers work as they do for SGD: the
        line search starts at ``alpha = lr`` (paper: 1, the default) and backtracks from there,
        and P+-BFGS moves the residual by ``lr * residual_lr``. A scheduler that halves ``lr``
        halves the first trial step and the residual step.
    c : float
        Armijo constant, in (0, 1) (paper: 0.4).
    beta : float, optional
        Backtracking factor, in (0, 1). Default: the paper's 0.55 (the official code's 0.4 with
        ``official=True``).
    max_trials : int
        Line-search trials per step, >= 1; a step whose trials all fail is counted in
        ``stats["failures"]``. It is not taken, and B is reset to the identity: a curvature
        pair from two noisy mini-batches can make B so large that no trial passes, and since a
        step not taken gives no new pair, B would otherwise never recover (the next step is
        steepest descent, as the first one is). With ``official=True``, as in the official
        code, the step of the next, untested size ``lr * beta**max_trials`` is taken and B kept.
    plus : bool
        Also move the residual gradient by SGD with momentum (P+-BFGS).
    residual_lr, residual_momentum : float
        Step size (> 0) and momentum (in [0, 1)) of the residual update (paper: 0.01, 0.9).
    weight_decay : float
        L2 coefficient (>= 0; off by default, as in the paper): ``weight_decay / 2 * |w|^2`` is
        added to the objective, so to the gradient and to every line-search loss.
    eps : float, optional
        Curvature threshold of the BFGS update (> 0). Default 1e-10 (the official code's 1e-20
        with ``official=True``).
    restore : {"copy", "offset"}
        How parameters return to the step's origin between line-search trials: ``"copy"`` keeps
        one flat copy of the parameters and restores them exactly; ``"offset"`` moves by the
        difference of step sizes along the d-dim direction, with no copy (for models where one
        more copy does not fit), restoring them to float rounding.
    buffers : iterable of Tensor, optional
        Buffers that forward passes update, typically ``model.buffers()`` (BatchNorm running
        statistics). A rejected line-search trial's forward pass at a far-off point would leave
        its activations in them (10% per pass with BatchNorm's default momentum); given here,
        they are put back after every rejected trial, so a step updates them twice: once at the
        step's origin and once at the accepted point (with ``official=True``: put back after
        every trial, the accepted one too, so they are updated once per step, at the origin, as
        the official code's reload of the whole state_dict after each trial does). Default: not
        restored, so every trial's pass updates them (1 + trials updates per step).
    official : bool
        Take the official code's step (nblt/DLDR ``train_pbfgs.py``) where it differs from the
        paper's: ``beta`` 0.4 and ``eps`` 1e-20 by default, Armijo's test strict (``<``), the
        failure rule above, ``buffers`` put back after every trial, and the trials run on the
        RNG as it goes (no replay of the gradient pass's dropout masks). The paper's step is the
        default.
    process_group : ProcessGroup, optional
        Under torch.distributed (the default group when one is initialized): every loss the
        line search decides on is the mean over the ranks (one scalar all-reduce per closure
        call), so all ranks take the same trials and keep the same B and parameters. Gradients
        must arrive averaged over the ranks (``DistributedDataParallel``); the parameters may be
        the whole model on every rank, or, with a sharded basis (``basis.on(device, shard=...)``),
        this rank's slice of the flat parameter vector.
    check_ranks : bool
        Under torch.distributed, check after every gradient that the ranks agree (the projected
        gradient bit for bit; sums of the gradients and parameters) and raise
        :class:`~trajstore.distributed.RankMismatchError` if not: one all-reduce of ``2 (d + 2)``
        values and two float64 sums over the parameters per step.

    Notes
    -----
    Memory: with ``restore="copy"`` one flat copy of the parameters, the d x d matrix B, and with
    ``plus`` one momentum buffer per parameter. Every step calls the
    closure once with gradients and up to ``max_trials`` times without; trial calls replay the
    step's RNG state, so dropout masks match the gradient's forward pass.
    """

    def __init__(self, params: Iterable[torch.Tensor], basis: Any, *, lr: float = 1.0, c: float = 0.4,
                 beta: float | None = None, max_trials: int = 20, plus: bool = False, residual_lr: float = 0.01,
                 residual_momentum: float = 0.9, weight_decay: float = 0.0, eps: float | None = None,
                 restore: str = "copy", buffers: Iterable[torch.Tensor] | None = None, process_group: Any = None,
                 check_ranks: bool = True, official: bool = False) -> None:
        if not isinstance(official, bool):
            raise TypeError(f"official must be True or False, got {official!r}")
        beta = (OFFICIAL_BETA if official else PAPER_BETA) if beta is None else beta
        eps = (OFFICIAL_EPS if official else PAPER_EPS) if eps is None else eps
        _check("lr", lr, 0.0, float("inf"), "> 0")
        _check("c", c, 0.0, 1.0, "in (0, 1)")
        _check("beta", beta, 0.0, 1.0, "in (0, 1)")
        if isinstance(max_trials, bool) or not isinstance(max_trials, int) or max_trials < 1:
            raise ValueError(f"max_trials must be an integer >= 1, got {max_trials!r}")
        _check("residual_lr", residual_lr, 0.0, float("inf"), "> 0")
        if not isinstance(residual_momentum, (int, float)) or not 0.0 <= residual_momentum < 1.0:
            raise ValueError(f"residual_momentum must be in [0, 1), got {residual_momentum!r}")
        if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        _check("eps", eps, 0.0, float("inf"), "> 0")
        if restore not in ("copy", "offset"):
            raise ValueError(f"restore must be 'copy' or 'offset', got {restore!r}")
        defaults = {"lr": float(lr), "restore": restore, "c": c, "beta": beta, "max_trials": max_trials, "plus": bool(plus), "residual_lr": residual_lr,
                    "residual_momentum": residual_momentum, "weight_decay": weight_decay, "eps": eps,
                    "official": official}
        super().__init__(params, defaults)
        self._bind(basis, process_group, check_ranks)
        self._buffers = list(buffers or ())
        if any(not isinstance(b, torch.Tensor) for b in self._buffers):
            raise TypeError("buffers must be tensors, e.g. model.buffers()")

    @property
    def stats(self) -> dict[str, Any]:
        """Steps, line-search trials per step, the accepted step size ``alpha`` per step (0 for a
        failed line search), skipped BFGS updates, failed line searches."""
        st = self._state()
        return {"steps": st["n_steps"], "trials": list(st["trials"]), "step_sizes": list(st["alphas"]),
                "skipped_updates": st["skipped"], "failures": st["failures"]}

    def _state(self) -> dict[str, Any]:
        state = self.state[self._params[0]]
        if "B" not in state:
            p = self._params[0]
            d = self._basis.d
            state.update(B=torch.eye(d, dtype=p.dtype, device=p.device), prev_g=None, prev_s=None,
                         n_steps=0, trials=[], alphas=[], skipped=0, failures=0)
        state.setdefault("alphas", [0.0] * state["n_steps"])  # a state_dict saved before step sizes were kept
        return state

    def _objective(self, loss: torch.Tensor) -> float:
        """The loss (the mean over ranks under torch.distributed) plus the weight-decay term."""
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        wd = self.defaults["weight_decay"]
        # |w|^2 without a temporary per parameter (this runs on every line-search trial)
        square = sum(float(torch.dot(p.detach().reshape(-1), p.detach().reshape(-1))) for p in self._params) if wd else 0.0
        if self._group is not None:  # one all-reduce: the losses, and |w|^2 of sharded parameters
            both = sum_over_ranks(torch.tensor([value, 0.0 if self._replicated else square], dtype=torch.float64),
                                  self._group)
            value = float(both[0]) / rank_and_world(self._group)[1]
            square = square if self._replicated else float(both[1])
        return value + 0.5 * wd * square

    def _call(self, closure: Callable[[], Any], *, grad: bool) -> float:
        if grad:
            with torch.enable_grad():
                return self._objective(closure())
        try:
            return self._objective(closure())
        except RuntimeError as e:
            if "does not require grad" in str(e):
                raise ClosureError(_CLOSURE_FIX) from e
            raise

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> torch.Tensor:  # type: ignore[override]
        """One P-BFGS step; ``closure`` zeroes the gradients, computes the loss, and calls
        ``backward()`` only when ``torch.is_grad_enabled()``. Returns the loss before the step
        (the objective the line search used: under torch.distributed the mean over the ranks,
        with the weight-decay term when there is one) as a 0-d float64 tensor, as
        ``torch.optim.LBFGS`` returns a tensor."""
        if closure is None:
            raise ClosureError("PBFGS.step needs a closure (it re-evaluates the loss in its line search)")
        group, st = self.param_groups[0], self._state()
        official = group.get("official", False)
        devices = {p.device for p in self._params}
        rng_before = _rng_state(devices) if not official else None
        loss0 = self._call(closure, grad=True)
        rng_after = _rng_state(devices) if not official else None
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        if group["weight_decay"]:
            grads = [g.add(p, alpha=group["weight_decay"]) for g, p in zip(grads, self._params)]
        g = self._basis.project(grads).to(self._params[0].dtype)
        if self._check_ranks:
            check_step(self._group, g, grads, self._params, self._replicated)
        if st["prev_g"] is not None:
            st["B"], updated = bfgs_update(st["B"], st["prev_s"], g - st["prev_g"], group["eps"])
            st["skipped"] += int(not updated)
        direction = -(st["B"] @ g)
        slope = float(torch.dot(g, direction))
        alpha, accepted, trials = self._line_search(closure, direction, loss0, slope, rng_before, group)
        if rng_after is not None:
            _set_rng_state(rng_after)
        st["n_steps"] += 1
        st["trials"].append(trials)
        st["alphas"].append(alpha if accepted or official else 0.0)
        st["failures"] += int(not accepted)
        if accepted or official:  # the official code keeps B and the (untested) step taken
            st["prev_s"], st["prev_g"] = alpha * direction, g
        else:
            st["prev_s"], st["prev_g"] = None, None  # no step taken: no curvature pair either
            st["B"] = torch.eye(st["B"].shape[0], dtype=st["B"].dtype, device=st["B"].device)
        if group["plus"]:
            self._residual_step(grads, g, group)
        return torch.tensor(loss0, dtype=torch.float64)

    def _line_search(self, closure: Callable[[], Any], direction: torch.Tensor, loss0: float, slope: float,
                     rng: Any, group: dict[str, Any]) -> tuple[float, bool, int]:
        """Backtrack from ``alpha = lr``; returns (alpha, accepted, trials) with the parameters at
        the step taken: the accepted trial's, or, when every trial fails, the origin (the
        official rule: the next, untested alpha)."""
        official = group.get("official", False)
        # "copy": one flat copy restores the parameters exactly; "offset": move by the difference
        # of step sizes along the d-dim direction (no copy; restores to rounding).
        origin = torch.nn.utils.parameters_to_vector(self._params) if group["restore"] == "copy" else None
        saved = [b.clone() for b in self._buffers]
        alpha, applied, accepted, trials = float(group["lr"]), 0.0, False, 0
        for trials in range(1, group["max_trials"] + 1):
            self._basis.lift(direction, out=self._params, alpha=alpha - applied)
            applied = alpha
            if rng is not None:
                _set_rng_state(rng)
            trial = self._call(closure, grad=False)
            accepted = armijo_accepts(loss0, trial, alpha, slope, group["c"], strict=official)
            if official or not accepted:  # official: the whole state_dict is reloaded after every trial
                for b, value in zip(self._buffers, saved):
                    b.copy_(value)
            if accepted:
                break
            if origin is not None:
                _restore(self._params, origin)
                applied = 0.0
            alpha *= group["beta"]
        if not accepted:
            target = alpha if official else 0.0
            if applied != target:
                self._basis.lift(direction, out=self._params, alpha=target - applied)
        return alpha, accepted, trials

    def _residual_step(self, grads: list[torch.Tensor], g: torch.Tensor, group: dict[str, Any]) -> None:
        """SGD with momentum on ``g - P g~``: ``m = gamma m + (g - P g~)``, ``w -= lr residual_lr m``."""
        buffers = []
        for p, grad in zip(self._params, grads):
            state = self.state[p]
            if "residual_momentum" not in state:
                state["residual_momentum"] = torch.zeros_like(p)
            state["residual_momentum"].mul_(group["residual_momentum"]).add_(grad)
            buffers.append(state["residual_momentum"])
        self._basis.lift(g, out=buffers, alpha=-1.0)
        for p, m in zip(self._params, buffers):
            p.add_(m, alpha=-group["lr"] * group["residual_lr"])


def _restore(params: list[torch.Tensor], origin: torch.Tensor) -> None:
    """Copy a flat vector back into the parameters (in place: vector_to_parameters would make the
    parameters views of ``origin``, which the next trial's in-place step would then overwrite)."""
    offset = 0
    for p in params:
        p.copy_(origin[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def _check(name: str, value: object, lo: float, hi: float, text: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value < hi:
        raise ValueError(f"{name} must be {text}, got {value!r}")
