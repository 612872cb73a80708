"""A local optimiser for SOFT clients that does not flatten component importances.

Adam normalises every entry by its own second moment, so a freshly started Adam moves
every entry of A and B by about ``lr`` per step, whatever its gradient: the rank
components all change by similar amounts and ranking them by ‖D_i‖ says little. SGD keeps
the gradient's structure but needs a learning rate tuned to the gradient's scale.
:class:`TensorwiseAdam` keeps Adam's scale-freeness per *tensor*: the first moment is
per entry, the second moment is one scalar per tensor (the mean of g²), so a step is
lr · m̂ / √v̂ — the momentum direction, with an RMS step of about ``lr``. Within a tensor
the relative sizes of the entries (and so of the rank components) are the gradient's.
"""

from __future__ import annotations

import math

import torch

__all__ = ["TensorwiseAdam"]


class TensorwiseAdam(torch.optim.Optimizer):
    """Adam with one second-moment scalar per parameter tensor (see the module docstring).

    Args:
        params: parameters or parameter groups.
        lr: step size (RMS of a step, per tensor, once the moments settle), > 0.
        betas: (β1, β2) in [0, 1).
        eps: added to √v̂, > 0.
        weight_decay: decoupled (AdamW-style) weight decay, ≥ 0.
    """

    def __init__(self, params, lr: float = 2e-3, betas=(0.9, 0.999), eps: float = 1e-12, weight_decay: float = 0.0):
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0; got lr = {lr!r}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1); got betas = {betas!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0; got eps = {eps!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0; got weight_decay = {weight_decay!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["m"] = torch.zeros_like(p)
                    st["v"] = torch.zeros((), dtype=p.dtype, device=p.device)
                st["step"] += 1
                t = st["step"]
                st["m"].mul_(b1).add_(g, alpha=1 - b1)
                st["v"].mul_(b2).add_((g * g).mean(), alpha=1 - b2)
                mhat = st["m"] / (1 - b1**t)
                vhat = st["v"] / (1 - b2**t)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(mhat / (vhat.sqrt() + group["eps"]), alpha=-group["lr"])
        return loss
