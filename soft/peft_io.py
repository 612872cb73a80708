"""Read and write the LoRA factors of a peft model as a SOFT factor set.

peft stores, for every adapted module, ``lora_A[adapter]`` (a Linear with weight r×n) and
``lora_B[adapter]`` (weight m×r). :func:`read_lora` returns those live parameters keyed by
the module's name without peft's ``base_model.model.`` prefix (the names
``tsfa.LoraShape.from_config`` produces); :func:`write_lora` copies values back in.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from soft.factors import Factors

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
    """Copy ``factors`` into the model's LoRA parameters, in place, under ``torch.no_grad()``.

    ``factors`` must name exactly the model's LoRA modules with the same shapes; values may be
    tensors or arrays (converted to the parameter's dtype and device). Everything is checked
    before anything is copied, so a bad entry leaves the model unchanged.
    """
    import numpy as np

    live = read_lora(model, adapter)
    if not isinstance(factors, Mapping):
        raise ValueError(f"factors must be a mapping name -> (A, B); got {type(factors).__name__}")
    missing, unknown = sorted(set(live) - set(factors)), sorted(set(factors) - set(live))
    if missing or unknown:
        raise ValueError(f"factors must name exactly the model's LoRA modules; missing {len(missing)} "
                         f"(e.g. {missing[:2]}), unknown {len(unknown)} (e.g. {unknown[:2]})")
    staged = []
    for name, (a_live, b_live) in live.items():
        pair = factors[name]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"factors[{name!r}] must be a pair (A, B)")
        for which, new, old in (("A", pair[0], a_live), ("B", pair[1], b_live)):
            t = new.detach() if isinstance(new, torch.Tensor) else torch.tensor(np.asarray(new))
            if tuple(t.shape) != tuple(old.shape):
                raise ValueError(f"shape mismatch in {name!r}: {which} is {tuple(t.shape)}, "
                                 f"the model's is {tuple(old.shape)}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{which} of {name!r} has non-finite entries (NaN or inf)")
            staged.append((old, t))
    with torch.no_grad():
        for old, t in staged:
            old.copy_(t.to(dtype=old.dtype, device=old.device))
