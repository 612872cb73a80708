"""Client-side error feedback on factor sets (docs/model.md, "Error feedback").

A client keeps what it did not send: its residual e = (local + e_prev) − (global + sent),
per module a pair (e_A, e_B) in the coordinates of the global factors it trained from.
That covers the dropped components, the rounding of a quantised payload, and, for a client
that is not scheduled, its whole update. Next round it trains from the new global factors
and sends from local + e (:func:`with_residual`).

The server's re-orthogonalisation rewrites the global factors (A, B) → (M A, B M⁻¹) with
B·A unchanged, M r×r per module. A residual in the old coordinates is re-expressed in the
new ones by the same change of basis, (e_A, e_B) → (M e_A, e_B M⁻¹), which keeps the
product (B + e_B)(A + e_A) exactly: :func:`rotate_residuals`. M is computed from the r×n
factors A and M A alone (no m×n product), so a server can broadcast it (L·r² values).
"""

from __future__ import annotations

import torch

from soft.factors import Factors

__all__ = ["with_residual", "residual", "basis_change", "with_inverse", "rotate", "rotate_residuals"]


def with_residual(local: Factors, res: dict | None) -> dict:
    """``local`` plus the residual (``res`` None: ``local`` unchanged)."""
    if res is None:
        return dict(local)
    return {n: (A + res[n][0].to(A.dtype), B + res[n][1].to(B.dtype)) for n, (A, B) in local.items()}


def residual(effective: Factors, applied: Factors) -> dict:
    """What was not sent: ``effective`` (local + previous residual) minus ``applied`` (the
    global factors plus what the payload carried), per module, detached."""
    return {n: (A.detach() - applied[n][0].detach(), B.detach() - applied[n][1].detach())
            for n, (A, B) in effective.items()}


def basis_change(before: Factors, after: Factors) -> dict:
    """Per module, (M, M⁻¹) with after.A = M · before.A (least squares over the r×n rows;
    exact when ``after`` re-orthogonalises ``before``), in float64."""
    out = {}
    for n, (A0, _) in before.items():
        A1 = after[n][0]
        a0, a1 = A0.detach().double(), A1.detach().double()
        out[n] = torch.linalg.lstsq(a0.transpose(0, 1), a1.transpose(0, 1)).solution.transpose(0, 1)
    return with_inverse(out)


def with_inverse(matrices: dict) -> dict:
    """``{module: M}`` → ``{module: (M, M⁻¹)}`` (float64): what :func:`rotate` takes. A client
    that receives only M (L·r² values) computes M⁻¹ the same way the server does."""
    return {n: (M, torch.linalg.inv(M)) for n, M in matrices.items()}


def rotate(res: dict, change: dict) -> dict:
    """One residual re-expressed by the basis change ``change`` (``{module: (M, M⁻¹)}``):
    (e_A, e_B) → (M e_A, e_B M⁻¹)."""
    return {n: ((change[n][0] @ eA.double()).to(eA.dtype), (eB.double() @ change[n][1]).to(eB.dtype))
            for n, (eA, eB) in res.items()}


def rotate_residuals(residuals: list, before: Factors, after: Factors, change: dict | None = None) -> list:
    """Every client's residual re-expressed in the basis of ``after`` (module docstring; or by
    ``change``, :func:`basis_change` of the two, when already computed); None entries stay None."""
    if all(e is None for e in residuals):
        return list(residuals)
    change = change if change is not None else basis_change(before, after)
    return [None if e is None else rotate(e, change) for e in residuals]
