"""The official code's P(+)-BFGS step, re-implemented for the tests from its source (nblt/DLDR,
``train_pbfgs.py``, function ``P_plus_BFGS`` and the loop of ``train``), without its disk
round trips: what it does, in its order, with its constants.

Per batch, in train mode: a forward and backward pass at the origin gives ``oldf`` and the flat
gradient ``grad``. With ``P`` the d x n matrix of basis rows:

- ``gk = P grad``; ``grad_res = grad - P^T gk``;
- if there is a previous ``gk_last``: ``yk = gk - gk_last``, and if ``yk^T sk > 1e-20`` the
  inverse-Hessian update ``Bk = t1^T Bk t1 + pk sk sk^T`` with ``t1 = I - pk yk sk^T``,
  ``pk = 1 / yk^T sk``; then ``gk_last = gk`` (always);
- ``dk = -Bk gk``, ``descent = gk^T dk``; the whole state (parameters and buffers) is copied;
  ``sk = dk``; up to 20 times: the parameters move by ``P^T sk`` (an SGD step of lr 1 on the
  gradient ``P^T (-sk)``), a forward pass in train mode gives ``newf``, the copy is loaded back
  (buffers included, after every trial), and if ``newf < oldf + 0.4 descent`` the search stops;
  otherwise ``descent`` and ``sk`` are scaled by ``rho = 0.4`` (the source sets 0.55 and then
  overwrites it);
- the momentum ``m = gamma m + grad_res``, and the parameters move by ``P^T sk - alpha m`` (one
  SGD step on the gradient ``P^T (-sk) + alpha m``): the accepted step, or after 20 failures
  the last, untested ``sk``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class OfficialStep:
    def __init__(self, model: nn.Module, p: torch.Tensor, *, alpha: float = 0.0, gamma: float = 0.9) -> None:
        self.model, self.p = model, p
        self.alpha, self.gamma = alpha, gamma
        self.sgd = torch.optim.SGD(model.parameters(), lr=1, momentum=0)
        self.bk = torch.eye(p.shape[0], dtype=p.dtype)
        self.sk: torch.Tensor | None = None
        self.gk_last: torch.Tensor | None = None
        self.momentum: torch.Tensor | float = 0.0
        self.search_times: list[int] = []

    def _grad_vec(self) -> torch.Tensor:
        return torch.cat([q.grad.detach().reshape(-1) for q in self.model.parameters()])

    def _set_grad(self, vec: torch.Tensor) -> None:
        offset = 0
        for q in self.model.parameters():
            q.grad.data = vec[offset:offset + q.numel()].reshape(q.shape).clone()
            offset += q.numel()

    def step(self, x: torch.Tensor, y: torch.Tensor, trial_penalty: float = 0.0) -> float:
        self.model.train()
        loss = nn.CrossEntropyLoss()(self.model(x), y)
        loss.backward()
        self._update(self._grad_vec(), loss.item(), x, y, trial_penalty)
        self.sgd.zero_grad()
        return loss.item()

    def _update(self, grad: torch.Tensor, oldf: float, x: torch.Tensor, y: torch.Tensor, penalty: float) -> None:
        p = self.p
        gk = torch.mm(p, grad.reshape(-1, 1))
        grad_res = grad - torch.mm(p.transpose(0, 1), gk).reshape(-1)
        if self.gk_last is not None:
            yk = gk - self.gk_last
            g = torch.mm(yk.transpose(0, 1), self.sk)[0, 0]
            if g > 1e-20:
                pk = 1.0 / g
                t1 = torch.eye(p.shape[0], dtype=p.dtype) - torch.mm(pk * yk, self.sk.transpose(0, 1))
                self.bk = torch.mm(torch.mm(t1.transpose(0, 1), self.bk), t1) + torch.mm(pk * self.sk, self.sk.transpose(0, 1))
        self.gk_last = gk
        dk = -torch.mm(self.bk, gk)
        descent = torch.mm(gk.transpose(0, 1), dk)[0, 0]
        saved = copy.deepcopy(self.model.state_dict())
        sk = dk
        m = 0
        while m < 20:
            self._set_grad(torch.mm(p.transpose(0, 1), -sk).reshape(-1))
            self.sgd.step()
            newf = nn.CrossEntropyLoss()(self.model(x), y).item() + penalty
            self.model.load_state_dict(saved)
            if newf < oldf + 0.4 * descent:
                self.search_times.append(m)
                break
            m += 1
            descent = descent * 0.4
            sk = sk * 0.4
        self.sk = sk
        self.momentum = self.momentum * self.gamma + grad_res
        self._set_grad(torch.mm(p.transpose(0, 1), -sk).reshape(-1) + self.momentum * self.alpha)
        self.sgd.step()
