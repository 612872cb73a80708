"""LoRA factors as plain tensors, their validation, the orthogonality penalty and the
server-side re-orthogonalisation (spec §1, §3).

A *factor set* is a mapping ``name -> (A, B)`` with A ∈ R^{r×n} (rows a_i) and
B ∈ R^{m×r} (columns b_i); the adapter of a module is B·A (times peft's scaling α/r,
which does not change any selection or ratio here). Insertion order is the module order
on the wire.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tsfa.model import LoraShape, ModuleShape

Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]

__all__ = [
    "Factors",
    "check_pair",
    "check_factors",
    "shape_of",
    "shape_of_checked",
    "clone_factors",
    "orthogonality_penalty",
    "factors_penalty",
    "reorthogonalize",
    "product_norm_sq",
    "reorthogonalize_factors",
    "orthogonality_defect",
]


def check_pair(A, B, name: str = "module") -> tuple[torch.Tensor, torch.Tensor]:
    """Validate one (A, B) pair: 2-D float tensors, A r×n, B m×r, finite. Returns them."""
    for label, t in (("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{label} of {name!r} must be a torch.Tensor; got {type(t).__name__}")
        if t.ndim != 2:
            raise ValueError(f"{label} of {name!r} must be 2-D; got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{label} of {name!r} must be a floating tensor; got dtype {t.dtype}")
    if A.shape[0] != B.shape[1]:
        raise ValueError(
            f"rank mismatch in {name!r}: A is {tuple(A.shape)} (r×n) but B is {tuple(B.shape)} (m×r)"
        )
    for label, t in (("A", A), ("B", B)):
        # One reduction, no mask: a finite sum has no NaN or inf among its terms (they propagate);
        # an infinite sum of finite entries (overflow) gets the elementwise check.
        if bool(torch.isfinite(t.detach().sum())) or bool(torch.isfinite(t).all()):
            continue
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{label} of {name!r} has {bad} non-finite entries (NaN or inf)")
    return A, B


def check_factors(factors: Factors, label: str = "factors") -> int:
    """Validate a factor set; returns its common rank r."""
    if not isinstance(factors, Mapping) or not factors:
        raise ValueError(f"{label} must be a non-empty mapping name -> (A, B); got {type(factors).__name__}")
    ranks = set()
    for name, pair in factors.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"{label}[{name!r}] must be a pair (A, B); got {type(pair).__name__}")
        A, _ = check_pair(pair[0], pair[1], name)
        ranks.add(int(A.shape[0]))
    if len(ranks) != 1:
        raise ValueError(f"{label} must share one rank across modules; got ranks {sorted(ranks)}")
    return ranks.pop()


def check_same_layout(a: Factors, b: Factors, la: str = "old", lb: str = "new") -> int:
    """Both sets have the same modules in the same order with the same shapes; returns r."""
    r = check_factors(a, la)
    check_factors(b, lb)
    if list(a) != list(b):
        raise ValueError(f"{la} and {lb} must list the same modules in the same order; got {list(a)} vs {list(b)}")
    for name in a:
        for i, t in enumerate("AB"):
            if a[name][i].shape != b[name][i].shape:
                raise ValueError(
                    f"shape mismatch in {name!r}: {la} {t} is {tuple(a[name][i].shape)}, "
                    f"{lb} {t} is {tuple(b[name][i].shape)}"
                )
    return r


def shape_of(factors: Factors, bits_per_value: int = 32, header_bits: int | None = None) -> LoraShape:
    """The :class:`tsfa.LoraShape` of a factor set (module order kept)."""
    check_factors(factors)
    return shape_of_checked(factors, bits_per_value, header_bits)


def shape_of_checked(factors: Factors, bits_per_value: int = 32, header_bits: int | None = None) -> LoraShape:
    """:func:`shape_of` for a factor set already checked (:func:`check_factors`)."""
    mods = tuple(ModuleShape(name, int(B.shape[0]), int(A.shape[1])) for name, (A, B) in factors.items())
    kw = {} if header_bits is None else {"header_bits": header_bits}
    return LoraShape(mods, int(next(iter(factors.values()))[0].shape[0]), bits_per_value, **kw)


def clone_factors(factors: Factors) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Detached copies (the live peft parameters change under training)."""
    return {k: (A.detach().clone(), B.detach().clone()) for k, (A, B) in factors.items()}


def orthogonality_penalty(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """R_orth of one module: ‖A Aᵀ − I‖²_F + ‖offdiag(Bᵀ B)‖²_F (spec §3).

    Only r×r Gram matrices are formed; differentiable in A and B. A is pushed towards
    orthonormal rows, B towards orthogonal columns (their norms are free: they carry the
    component magnitudes).
    """
    r = A.shape[0]
    ga = A @ A.transpose(0, 1)
    gb = B.transpose(0, 1) @ B
    eye = torch.eye(r, dtype=A.dtype, device=A.device)
    off = gb - torch.diag_embed(torch.diagonal(gb))
    return ((ga - eye) ** 2).sum() + (off**2).sum()


def factors_penalty(factors: Factors) -> torch.Tensor:
    """Σ over modules of :func:`orthogonality_penalty`."""
    return sum(orthogonality_penalty(A, B) for A, B in factors.values())


def orthogonality_defect(A: torch.Tensor, B: torch.Tensor) -> tuple[float, float]:
    """(max |cos| between rows of A, max |cos| between columns of B), 0 = orthogonal."""
    out = []
    for M in (A, B.transpose(0, 1)):
        n = M.norm(dim=1, keepdim=True).clamp_min(1e-30)
        g = (M / n) @ (M / n).transpose(0, 1)
        g = g - torch.diag_embed(torch.diagonal(g))
        out.append(float(g.abs().max()) if g.numel() else 0.0)
    return out[0], out[1]


def reorthogonalize(A: torch.Tensor, B: torch.Tensor, scaling: str = "a-orthonormal"):
    """Rewrite (A, B) so that B·A is unchanged and the factors are orthogonal.

    Thin QR of B (m×r) and of Aᵀ (n×r), SVD of the r×r core R_B R_Aᵀ = U Σ Vᵀ; then

    * ``"a-orthonormal"`` (default): A' = Vᵀ Q_Aᵀ (orthonormal rows), B' = Q_B U Σ
      (orthogonal columns with norms σ_i). At peft's initialisation (B = 0) this only
      rotates A to orthonormal rows and keeps B = 0, so no component is frozen.
    * ``"balanced"``: A' = √Σ Vᵀ Q_Aᵀ, B' = Q_B U √Σ (both carry √σ_i; a zero σ_i makes
      both factors of that component zero, which stalls its gradient).

    Components come out sorted by σ_i, largest first, so b'_i a'_iᵀ is the product's SVD.
    Cost O(r²(m + n)) — server side; clients never run it.
    """
    check_pair(A, B)
    if scaling not in ("a-orthonormal", "balanced"):
        raise ValueError(f"scaling must be 'a-orthonormal' or 'balanced'; got scaling = {scaling!r}")
    r = A.shape[0]
    dt = A.dtype
    A64, B64 = A.detach().double(), B.detach().double()
    qb, rb = torch.linalg.qr(B64, mode="reduced")
    qa, ra = torch.linalg.qr(A64.transpose(0, 1), mode="reduced")
    if qb.shape[1] < r or qa.shape[1] < r:  # m or n < r: LoraShape forbids it, keep the guard
        raise ValueError(f"rank {r} exceeds a factor dimension: A {tuple(A.shape)}, B {tuple(B.shape)}")
    u, s, vh = torch.linalg.svd(rb @ ra.transpose(0, 1))
    if scaling == "a-orthonormal":
        B2 = qb @ u * s
        A2 = vh @ qa.transpose(0, 1)
    else:
        rs = s.sqrt()
        B2 = qb @ u * rs
        A2 = rs[:, None] * (vh @ qa.transpose(0, 1))
    return A2.to(dt), B2.to(dt)


def reorthogonalize_factors(factors: Factors, scaling: str = "a-orthonormal") -> dict:
    """:func:`reorthogonalize` every module of a factor set."""
    check_factors(factors)
    return {k: reorthogonalize(A, B, scaling) for k, (A, B) in factors.items()}


def product_norm_sq(P: torch.Tensor, Q: torch.Tensor) -> float:
    """‖P Q‖²_F = tr((PᵀP)(QQᵀ)) without forming P Q (P m×k, Q k×n): the Gram-trace identity
    behind every factored norm in SOFT (error profiles, product errors, the covariance)."""
    return float(((P.transpose(0, 1) @ P) * (Q @ Q.transpose(0, 1))).sum())
