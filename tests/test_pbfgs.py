"""P-BFGS, P+-BFGS and P-SGD against dense references on quadratics with a known subspace.

Tolerances: float64 runs agree with a float64 numpy reference to ~1e-12 (same arithmetic, other
summation order); the convergence bars are the issue's (1e-10 in float64, 1e-5 in float32).
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

import trajstore.pbfgs as pbfgs_module
from trajstore import PBFGS, PSGD, ClosureError, dldr

N, D = 10_000, 8


class Point(nn.Module):
    def __init__(self, x0: np.ndarray, dtype: torch.dtype) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(x0, dtype=dtype))


def problem(dtype: torch.dtype, seed: int = 0, in_subspace: bool = True):  # type: ignore[no-untyped-def]
    """A quadratic f(x) = 1/2 (x - x*)^T diag(a) (x - x*) in n = 10,000 dimensions, and a basis
    found by DLDR from a trajectory that moves in a d-dim subspace containing x* - x0."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.standard_normal((N, D)))[0]
    x0 = rng.standard_normal(N)
    snapshots = x0 + rng.standard_normal((D + 4, D)) @ q.T
    snapshots[0] = x0
    basis = dldr(snapshots, D)
    x_star = x0 + q @ rng.standard_normal(D) if in_subspace else x0 + rng.standard_normal(N)
    a = rng.uniform(1.0, 10.0, N)
    model = Point(x0, dtype)
    at, xs = torch.tensor(a, dtype=dtype), torch.tensor(x_star, dtype=dtype)

    def closure() -> torch.Tensor:
        model.zero_grad()
        loss = 0.5 * (at * (model.x - xs) ** 2).sum()
        if torch.is_grad_enabled():
            loss.backward()
        return loss

    return model, closure, basis, x0, x_star, a


def reference_bfgs(u: np.ndarray, x0: np.ndarray, x_star: np.ndarray, a: np.ndarray, steps: int) -> list[np.ndarray]:
    """Dense BFGS with Armijo backtracking in the d coordinates, written from the paper directly."""
    f = lambda z: 0.5 * np.sum(a * (x0 + u @ z - x_star) ** 2)  # noqa: E731
    grad = lambda z: u.T @ (a * (x0 + u @ z - x_star))  # noqa: E731
    z, b, iterates = np.zeros(u.shape[1]), np.eye(u.shape[1]), []
    prev = None
    for _ in range(steps):
        g = grad(z)
        if prev is not None:
            s, y = prev[0], g - prev[1]
            if y @ s > 1e-10:
                rho = 1 / (y @ s)
                i = np.eye(len(z))
                b = (i - rho * np.outer(s, y)) @ b @ (i - rho * np.outer(y, s)) + rho * np.outer(s, s)  # eq. (13)
        p = -b @ g
        alpha = 1.0
        for _ in range(20):
            if f(z + alpha * p) <= f(z) + 0.4 * alpha * (g @ p):  # eq. (14)
                break
            alpha *= 0.55
        z = z + alpha * p
        prev = (alpha * p, g)
        iterates.append(x0 + u @ z)
    return iterates


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_reaches_the_minimizer_and_matches_dense_reference(dtype: torch.dtype, tol: float) -> None:
    model, closure, basis, x0, x_star, a = problem(dtype)
    opt = PBFGS(model.parameters(), basis.on("cpu", dtype=dtype))
    reference = reference_bfgs(basis.to_numpy(), x0, x_star, a, 40)
    scale = np.linalg.norm(x_star - x0)
    failures_when_converged = None
    for k in range(40):
        opt.step(closure)
        x = model.x.detach().double().numpy()
        # iterates follow the dense d-dimensional BFGS to the same tolerance (relative to the path)
        assert np.linalg.norm(x - reference[k]) <= tol * scale, k
        if failures_when_converged is None and np.linalg.norm(x - x_star) / scale < tol:
            failures_when_converged = opt.stats["failures"]
    err = np.linalg.norm(model.x.detach().double().numpy() - x_star) / scale
    assert err < tol  # the minimizer, which lies in the subspace
    # No line search failed on the way; once at the minimizer, float32 rounding may leave Armijo
    # no decrease to find, and such steps are refused (and counted), never taken.
    assert failures_when_converged == 0 and opt.stats["steps"] == 40


def test_plus_residual_step_is_sgd_with_momentum_on_the_residual() -> None:
    # With f = 1/2 |x - x*|^2 the residual update moves x only orthogonally to the subspace and the
    # subspace steps only within it, so P+-BFGS = P-BFGS + momentum SGD on e = (I - PP^T)(x - x*).
    lr, gamma, steps = 0.1, 0.9, 6
    runs = {}
    for plus in (False, True):
        model, _, basis, x0, x_star, _ = problem(torch.float64, seed=3, in_subspace=False)
        xs = torch.tensor(x_star)

        def closure() -> torch.Tensor:
            model.zero_grad()
            loss = 0.5 * ((model.x - xs) ** 2).sum()
            if torch.is_grad_enabled():
                loss.backward()
            return loss

        opt = PBFGS(model.parameters(), basis.on("cpu", dtype=torch.float64), plus=plus, residual_lr=lr,
                    residual_momentum=gamma)
        for _ in range(steps):
            opt.step(closure)
        runs[plus] = model.x.detach().numpy().copy()
    u = basis.to_numpy()
    e = (x0 - x_star) - u @ (u.T @ (x0 - x_star))
    start, m = e.copy(), np.zeros_like(e)
    for _ in range(steps):
        m = gamma * m + e
        e = e - lr * m
    np.testing.assert_allclose(runs[True], runs[False] - (start - e), atol=1e-12)


def test_resume_is_bit_for_bit() -> None:
    def make():  # type: ignore[no-untyped-def]
        model, closure, basis, *_ = problem(torch.float32, seed=5, in_subspace=False)
        return model, closure, PBFGS(model.parameters(), basis.on("cpu"), plus=True)

    model, closure, opt = make()
    for _ in range(8):
        opt.step(closure)
    straight = model.x.detach().clone()
    model, closure, opt = make()
    for _ in range(4):
        opt.step(closure)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model, closure, opt = make()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    for _ in range(4):
        opt.step(closure)
    assert torch.equal(model.x.detach(), straight)  # bit for bit
    assert opt.stats["steps"] == 8


def test_closure_that_always_calls_backward_gets_the_fix() -> None:
    model, _, basis, _, x_star, _ = problem(torch.float64)
    xs = torch.tensor(x_star)

    def careless() -> torch.Tensor:
        model.zero_grad()
        loss = 0.5 * ((model.x - xs) ** 2).sum()
        loss.backward()
        return loss

    opt = PBFGS(model.parameters(), basis.on("cpu", dtype=torch.float64))
    with pytest.raises(ClosureError, match=r"if torch.is_grad_enabled\(\):"):
        opt.step(careless)


def test_failed_line_search_takes_no_step() -> None:
    model, closure, basis, *_ = problem(torch.float64)
    before = model.x.detach().clone()
    opt = PBFGS(model.parameters(), basis.on("cpu", dtype=torch.float64), max_trials=1, c=0.999)
    calls = {"n": 0}

    def worse_on_trials() -> torch.Tensor:
        loss = closure()
        calls["n"] += 1
        return loss if torch.is_grad_enabled() else loss + 1.0  # every trial looks worse

    opt.step(worse_on_trials)
    assert torch.equal(model.x.detach(), before)  # restored exactly
    assert opt.stats["failures"] == 1 and opt.stats["trials"] == [1]


def test_a_failed_line_search_resets_the_inverse_hessian() -> None:
    # A B blown up by one bad curvature pair makes every trial fail; without a reset the
    # optimizer never takes another step (no step, no new pair, the same B forever).
    model, closure, basis, *_ = problem(torch.float64)
    opt = PBFGS(model.parameters(), basis.on("cpu", dtype=torch.float64))
    opt.step(closure)
    assert opt.stats["failures"] == 0
    st = opt.state[model.x]
    st["B"] = torch.eye(D, dtype=torch.float64) * 1e12  # as after y.s ~ 1e-12
    opt.param_groups[0]["max_trials"] = 3  # 0.55^2 x 1e12 is still far too long a step
    before = model.x.detach().clone()
    opt.step(closure)
    assert opt.stats["failures"] == 1 and torch.equal(model.x.detach(), before)  # no step taken
    assert torch.equal(st["B"], torch.eye(D, dtype=torch.float64))  # back to steepest descent
    opt.param_groups[0]["max_trials"] = 20
    loss = closure().item()
    opt.step(closure)
    assert closure().item() < loss and opt.stats["failures"] == 1  # and it moves on


@pytest.mark.parametrize("kwargs, match", [
    ({"c": 0.0}, r"c must be in \(0, 1\), got 0.0"), ({"beta": 1.0}, r"beta must be in \(0, 1\), got 1.0"),
    ({"max_trials": 0}, "max_trials must be an integer >= 1, got 0"),
    ({"residual_lr": -1.0}, "residual_lr must be > 0, got -1.0"),
    ({"residual_momentum": 1.0}, r"residual_momentum must be in \[0, 1\), got 1.0"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0, got -0.1"),
    ({"restore": "disk"}, "restore must be 'copy' or 'offset', got 'disk'"),
])
def test_hyperparameters_are_validated(kwargs: dict, match: str) -> None:
    model, _, basis, *_ = problem(torch.float64)
    with pytest.raises(ValueError, match=match):
        PBFGS(model.parameters(), basis, **kwargs)


def test_psgd_moves_only_in_the_subspace_and_converges() -> None:
    model, closure, basis, x0, x_star, _ = problem(torch.float64)
    opt = PSGD(model.parameters(), basis.on("cpu", dtype=torch.float64), lr=0.05, momentum=0.9)
    u = basis.to_numpy()
    for _ in range(300):
        opt.step(closure)
    x = model.x.detach().numpy()
    moved = x - x0
    np.testing.assert_allclose(moved, u @ (u.T @ moved), atol=1e-10)  # stays in x0 + span(U)
    assert np.linalg.norm(x - x_star) / np.linalg.norm(x_star - x0) < 1e-6
    with pytest.raises(ValueError, match="lr must be > 0"):
        PSGD(model.parameters(), basis, lr=0)


@pytest.mark.slow
def test_resume_in_a_new_process_is_bit_for_bit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("_resume_process.py")

    def run(*args: str) -> str:
        proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()[0] + " " + proc.stdout.split()[1]

    straight = run("8")
    run("4", "--save", str(tmp_path / "state.pt"))
    resumed = run("4", "--load", str(tmp_path / "state.pt"))
    assert resumed == straight  # same parameter bytes and the same step count


def test_gradient_accumulation_uses_the_same_micro_batches_in_the_line_search() -> None:
    # A closure that accumulates over micro-batches (and, without gradients, sums the same
    # micro-batches' losses) gives the same steps as one closure over the whole batch.
    iterates = []
    for micro in (1, 4):
        model, _, basis, _, x_star, a = problem(torch.float64, seed=7)
        at, xs = torch.tensor(a), torch.tensor(x_star)
        parts = torch.arange(N).chunk(micro)

        def closure() -> torch.Tensor:
            model.zero_grad()
            total = torch.zeros((), dtype=torch.float64)
            for idx in parts:
                loss = 0.5 * (at[idx] * (model.x[idx] - xs[idx]) ** 2).sum()
                if torch.is_grad_enabled():
                    loss.backward()
                total = total + loss.detach()
            return total

        opt = PBFGS(model.parameters(), basis.on("cpu", dtype=torch.float64))
        for _ in range(5):
            opt.step(closure)
        iterates.append(model.x.detach().numpy().copy())
    np.testing.assert_allclose(iterates[1], iterates[0], rtol=0, atol=1e-12)


def test_offset_restore_matches_copy_restore() -> None:
    runs = {}
    for restore in ("copy", "offset"):
        model, closure, basis, *_ = problem(torch.float64, seed=9)
        opt = PBFGS(model.parameters(), basis.on("cpu", dtype=torch.float64), restore=restore)
        for _ in range(10):
            opt.step(closure)
        runs[restore] = (model.x.detach().numpy().copy(), opt.stats["trials"])
    assert runs["copy"][1] == runs["offset"][1] and max(runs["copy"][1]) > 1  # same backtracking, which did occur
    np.testing.assert_allclose(runs["offset"][0], runs["copy"][0], rtol=0, atol=1e-12)
    model, closure, basis, *_ = problem(torch.float64)
    before = model.x.detach().clone()
    opt = PBFGS(model.parameters(), basis.on("cpu", dtype=torch.float64), max_trials=3, restore="offset")
    opt.step(lambda: closure() + (0.0 if torch.is_grad_enabled() else 1e6))  # every trial fails
    assert opt.stats["failures"] == 1
    np.testing.assert_allclose(model.x.detach().numpy(), before.numpy(), rtol=0, atol=1e-12)  # back, to rounding


def test_line_search_trials_replay_the_gradient_pass_dropout_masks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Dropout(0.5), nn.Linear(64, 1))
    x, y = torch.randn(32, 20), torch.randn(32, 1)
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy().astype(np.float64)
    rng = np.random.default_rng(0)
    basis = dldr(flat + rng.standard_normal((6, flat.size)) * 0.01, 4)
    masks: list[tuple[bool, torch.Tensor]] = []
    model[1].register_forward_hook(lambda m, i, o: masks.append((torch.is_grad_enabled(), o != 0)))

    def closure() -> torch.Tensor:
        model.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        if torch.is_grad_enabled():
            loss.backward()
        return loss

    opt = PBFGS(model.parameters(), basis.on("cpu"), max_trials=4, c=0.999)  # c near 1: several trials
    torch.manual_seed(123)
    opt.step(closure)
    after_step = torch.get_rng_state()
    torch.manual_seed(123)
    torch.nn.Dropout(0.5)(torch.ones(32, 64))  # the one forward the gradient pass consumed
    assert torch.equal(after_step, torch.get_rng_state())  # the RNG stream advanced by one forward only
    grad_masks = [m for enabled, m in masks if enabled]
    trial_masks = [m for enabled, m in masks if not enabled]
    assert len(grad_masks) == 1 and len(trial_masks) == opt.stats["trials"][-1] >= 1
    for mask in trial_masks:
        assert torch.equal(mask, grad_masks[0])  # every trial saw the gradient pass's dropout mask


def test_weight_decay_equals_the_l2_term_in_the_objective() -> None:
    lam, runs = 0.3, []
    for builtin in (True, False):
        model, closure, basis, *_ = problem(torch.float64, seed=11, in_subspace=False)

        def with_l2() -> torch.Tensor:
            loss = closure() if not torch.is_grad_enabled() else None
            if loss is None:
                model.zero_grad()
                loss = closure()
                l2 = 0.5 * lam * (model.x ** 2).sum()
                l2.backward()
                return loss + l2.detach()
            return loss + 0.5 * lam * (model.x ** 2).sum()

        opt = PBFGS(model.parameters(), basis.on("cpu", dtype=torch.float64), weight_decay=lam if builtin else 0.0)
        for _ in range(6):
            opt.step(closure if builtin else with_l2)
        runs.append(model.x.detach().numpy().copy())
    np.testing.assert_allclose(runs[0], runs[1], rtol=0, atol=1e-10)


def classification_closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    def closure() -> torch.Tensor:
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if torch.is_grad_enabled():
            loss.backward()
        return loss

    return closure


def test_rejected_trials_leave_no_trace_in_batchnorm_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    n = sum(p.numel() for p in model.parameters())
    basis = dldr(np.random.default_rng(0).standard_normal((6, n)), 4)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    start = copy.deepcopy(model.state_dict())
    verdicts = iter([False, False, False, True])  # three rejected trials, then an accepted one
    monkeypatch.setattr(pbfgs_module, "armijo_accepts", lambda *a, **k: next(verdicts))
    opt = PBFGS(model.parameters(), basis, buffers=model.buffers())
    opt.step(classification_closure(model, x, y))
    assert opt.stats["trials"] == [4]
    # Reference: the same two passes an SGD step would make, at the origin and at the accepted point.
    ref = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    ref.load_state_dict(start)
    ref(x)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), model.parameters()):
            p.copy_(q)
    ref(x)
    bn, ref_bn = model[1], ref[1]
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=0, atol=1e-7)  # float32 rounding only
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=0, atol=1e-7)
    assert int(bn.num_batches_tracked) == 2  # the rejected trials' passes are not counted


def test_without_buffers_the_trials_pass_into_the_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    # The default (what a plain forward pass does): every trial's pass updates them, 1 + trials
    # updates per step. (The official code reloads the whole state_dict after every trial: one
    # update per step; see test_official_step.py.)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    basis = dldr(np.random.default_rng(0).standard_normal((6, sum(p.numel() for p in model.parameters()))), 4)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    verdicts = iter([False, False, True])
    monkeypatch.setattr(pbfgs_module, "armijo_accepts", lambda *a, **k: next(verdicts))
    opt = PBFGS(model.parameters(), basis)
    opt.step(classification_closure(model, x, y))
    assert int(model[1].num_batches_tracked) == 4
