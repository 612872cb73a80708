"""Estimate the covariance-weighted target spectrum of each adapted module from a pilot
gradient (spec §5: "for real models, estimate the spectrum from a pilot gradient").

For a linear module y = W x inside a model, with loss L averaged over N samples, the
gradient with respect to the frozen weight at the initial point is G = ∂L/∂W. If the loss
were the module's quadratic ½ E‖(W* − W) x‖², then G = −ΔW* Ŝ with Ŝ = XᵀX / N the input
second-moment matrix, so

    G Ŝ⁻¹ Gᵀ = ΔW* Ŝ ΔW*ᵀ,

whose eigenvalues are exactly the spectrum that ε(r) needs (``convergence.rank``). For a
real model the same formula gives the spectrum of the module's local quadratic model
along the pilot batch: an estimate, exact on the linear task. Ŝ is regularised by
``ridge`` · tr(Ŝ)/n when it is singular (fewer inputs than dimensions).

torch is imported inside the function: ``import convergence`` does not need it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

__all__ = ["estimate_spectrum"]


def estimate_spectrum(loss_fn: Callable[[], object], layers: Mapping[str, object], *, num_samples: int | None = None,
                      ridge: float = 1e-10) -> dict[str, np.ndarray]:
    """Per module, the eigenvalues (non-increasing) of G Ŝ⁻¹ Gᵀ.

    Args:
        loss_fn: computes the pilot loss (a scalar tensor) with one forward pass.
        layers: {name: module} whose ``weight`` (m×n) multiplies the module's input as
            ``x @ weight.T`` (an ``nn.Linear``, peft's ``base_layer``, or the linear task's
            module); inputs are captured with a forward pre-hook.
        num_samples: N, the number of loss terms the loss averages over (default: the
            number of captured input rows, right for per-sample inputs; pass the batch size
            for token sequences).
        ridge: relative regularisation of Ŝ, ≥ 0.
    """
    import torch

    if not layers:
        raise ValueError("layers must name at least one module")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0; got ridge = {ridge!r}")
    captured: dict[str, list] = {name: [] for name in layers}
    hooks, flags = [], {}
    try:
        for name, mod in layers.items():
            w = getattr(mod, "weight", None)
            if not isinstance(w, torch.Tensor) or w.ndim != 2:
                raise ValueError(f"layers[{name!r}] has no 2-D weight")
            flags[name] = w.requires_grad
            w.requires_grad_(True)
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, name=name: captured[name].append(args[0].detach().reshape(-1, args[0].shape[-1]))))
        loss = loss_fn()
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0 or not torch.isfinite(loss):
            raise ValueError(f"loss_fn must return a finite scalar tensor; got {loss!r}")
        grads = torch.autograd.grad(loss, [layers[n].weight for n in layers], allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
        for name, mod in layers.items():
            if name in flags:
                mod.weight.requires_grad_(flags[name])
    out = {}
    for (name, _), g in zip(layers.items(), grads, strict=True):
        if not captured[name] or g is None:
            raise ValueError(f"module {name!r} was not called by loss_fn")
        X = torch.cat(captured[name]).double()
        n_rows = X.shape[0] if num_samples is None else int(num_samples)
        S = X.T @ X / n_rows
        n = S.shape[0]
        S = S + ridge * float(torch.trace(S)) / n * torch.eye(n, dtype=S.dtype)
        G = g.double()
        M = G @ torch.linalg.solve(S, G.T)
        lam = torch.linalg.eigvalsh(0.5 * (M + M.T)).flip(0).clamp_min(0.0)
        out[name] = lam.numpy()
    return out
