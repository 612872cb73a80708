"""Read and write the LoRA factors of a peft model as a SOFT factor set.

peft stores, for every adapted module, ``lora_A[adapter]`` (a Linear with weight r×n) and
``lora_B[adapter]`` (weight m×r). :func:`read_lora` returns those live parameters keyed by
the module's name without peft's ``base_model.model.`` prefix (the names
``tsfa.LoraShape.from_config`` produces); :func:`write_lora` copies values back in.
"""

from __future__ import annotations

import torch

from soft.factors import Factors, check_factors

__all__ = ["read_lora", "write_lora"]

_PREFIX = "base_model.model."


def read_lora(model: torch.nn.Module, adapter: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A, B)} — the live ``nn.Parameter`` tensors, in module order."""
    out = {}
    for name, mod in model.named_modules():
        la, lb = getattr(mod, "lora_A", None), getattr(mod, "lora_B", None)
        if isinstance(la, torch.nn.ModuleDict) and isinstance(lb, torch.nn.ModuleDict) and adapter in la:
            key = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
            out[key] = (la[adapter].weight, lb[adapter].weight)
    if not out:
        raise ValueError(f"the model has no LoRA modules for adapter {adapter!r} (is it a peft model?)")
    return out


def write_lora(model: torch.nn.Module, factors: Factors, adapter: str = "default") -> None:
    """Copy ``factors`` into the model's LoRA parameters (same names and shapes required)."""
    check_factors(factors)
    live = read_lora(model, adapter)
    if list(live) != list(factors):
        missing = sorted(set(live) ^ set(factors))
        raise ValueError(f"factor names do not match the model's LoRA modules; differing: {missing[:4]}")
    with torch.no_grad():
        for name, (A, B) in factors.items():
            la, lb = live[name]
            if la.shape != A.shape or lb.shape != B.shape:
                raise ValueError(f"shape mismatch in {name!r}: model A {tuple(la.shape)}, B {tuple(lb.shape)}; "
                                 f"given A {tuple(A.shape)}, B {tuple(B.shape)}")
            la.copy_(A)
            lb.copy_(B)
