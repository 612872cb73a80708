"""Tasks: a model with LoRA factors, client datasets and an evaluation set (SPEC §10).

Every task exposes the same small interface to the loop:

* ``factors()`` — the live LoRA factors {name: (A, B)} (A r×n, B m×r);
* ``head()`` — other trainable parameters, sent dense (the classification head);
* ``scaling`` — γ = α/r, the adapter is γ·B·A; ``fold(name, delta)`` adds ``delta`` (m×n)
  to a frozen weight (used by the ``ideal`` and ``svd`` strategies);
* ``client_sizes`` and ``batch(k, indices)`` / ``sample(k, batch_size, rng)``;
* ``loss(batch)`` (a scalar tensor) and ``evaluate()`` → (test loss, accuracy or NaN);
* ``flops_per_sample`` for the compute-time model.

One model is shared by all simulated clients: the loop swaps adapters in and out, so
memory grows with K adapters, not with K models.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedloop import data as fd
from fedloop.config import RunConfig

__all__ = ["Task", "RTMiniLMTask", "LinearTask", "make_task"]


class Task:
    name = "task"
    accuracy_name = "accuracy"

    def factors(self) -> dict:
        raise NotImplementedError

    def head(self) -> dict:
        return {}

    def sample(self, k: int, batch_size: int, rng: np.random.Generator):
        idx = self.client_indices[k]
        take = rng.choice(len(idx), size=min(batch_size, len(idx)), replace=False)
        return self.batch(idx[np.sort(take)])

    def train(self):
        self.model.train()

    def eval(self):
        self.model.eval()


class RTMiniLMTask(Task):
    """all-MiniLM-L6-v2 + peft LoRA on query/value, sentiment of Rotten Tomatoes snippets."""

    name = "rt-minilm"

    def __init__(self, cfg: RunConfig):
        rt = fd.load_rotten_tomatoes()
        train, test = fd.train_test_split(len(rt.texts), cfg.test_fraction, cfg.seed)
        if cfg.split == "movie":
            parts = fd.split_by_movie(rt.movies, cfg.clients, cfg.seed, indices=train)
        else:
            parts = fd.split_dirichlet(rt.labels, cfg.clients, cfg.dirichlet_alpha, cfg.seed, indices=train)
        self.client_indices = [np.asarray(p) for p in parts]
        self.client_sizes = np.array([len(p) for p in parts], dtype=float)
        self.test_indices = test[: cfg.test_size] if cfg.test_size else test
        self.model, tok = fd.build_minilm_lora(cfg.rank, alpha=cfg.alpha, seed=cfg.seed)
        enc = fd.tokenize(tok, list(rt.texts), cfg.max_length)
        self.input_ids, self.attention_mask = enc["input_ids"], enc["attention_mask"]
        self.labels = torch.tensor(rt.labels)
        self._factors = fd.get_lora_factors(self.model)
        self._head = fd.head_parameters(self.model)
        first = next(m for m in self.model.modules() if hasattr(m, "scaling") and hasattr(m, "lora_A"))
        self.scaling = float(first.scaling["default"])
        self._base = {name: mod.base_layer.weight for name, mod in self._lora_modules()}
        n_params = sum(p.numel() for p in self.model.parameters())
        self.flops_per_sample = 6.0 * n_params * cfg.max_length

    def _lora_modules(self):
        out = []
        for name, mod in self.model.named_modules():
            if hasattr(mod, "lora_A") and hasattr(mod, "base_layer") and "default" in getattr(mod, "lora_A", {}):
                key = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
                out.append((key, mod))
        return out

    def factors(self):
        return self._factors

    def head(self):
        return self._head

    def fold(self, name: str, delta: torch.Tensor) -> None:
        with torch.no_grad():
            self._base[name].add_(delta.to(self._base[name].dtype))

    def batch(self, idx):
        idx = torch.as_tensor(np.asarray(idx))
        return self.input_ids[idx], self.attention_mask[idx], self.labels[idx]

    def loss(self, batch):
        ids, mask, y = batch
        out = self.model(input_ids=ids, attention_mask=mask)
        return torch.nn.functional.cross_entropy(out.logits, y)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        self.model.eval()
        total, correct, n = 0.0, 0, 0
        for i in range(0, len(self.test_indices), 128):
            ids, mask, y = self.batch(self.test_indices[i:i + 128])
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            total += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            n += len(y)
        return total / n, correct / n


class _LoraLinear(torch.nn.Module):
    """y = (W0 + γ B A) x with W0 frozen; A Kaiming-uniform, B = 0 (peft's initialisation)."""

    def __init__(self, m: int, n: int, r: int, alpha: float, gen: torch.Generator):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(m, n, generator=gen) / math.sqrt(n), requires_grad=False)
        bound = 1.0 / math.sqrt(n)
        self.lora_A = torch.nn.Parameter((torch.rand(r, n, generator=gen) * 2 - 1) * bound)
        self.lora_B = torch.nn.Parameter(torch.zeros(m, r))
        self.scaling = alpha / r

    def forward(self, x):
        return x @ self.weight.T + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T


class LinearTask(Task):
    """Linear teacher–student regression with a chosen target spectrum (SPEC §10).

    Settings (``RunConfig.linear``): ``modules`` (2), ``dim`` (m = n = 32), ``true_rank``
    (4), ``decay`` (1.0: the target update of every module has singular values
    σ_i = scale · i^(−decay), i ≤ true_rank), ``scale`` (1.0), ``samples`` per client (200),
    ``noise`` (0.1), ``heterogeneity`` (0.5: client k's inputs have covariance
    diag(exp(h·z_k)) with z_k standard normal per coordinate). The student is W0 + γBA per
    module with W0 the teacher's frozen part; the loss is ½‖ŷ − y‖² averaged over samples.
    """

    name = "linear"
    accuracy_name = "accuracy"

    def __init__(self, cfg: RunConfig):
        s = {"modules": 2, "dim": 32, "true_rank": 4, "decay": 1.0, "scale": 1.0, "samples": 200, "noise": 0.1,
             "heterogeneity": 0.5, "test_samples": 2000}
        unknown = sorted(set(cfg.linear) - set(s))
        if unknown:
            raise ValueError(f"unknown linear-task settings {unknown}; known: {sorted(s)}")
        s.update(cfg.linear)
        self.settings = s
        self.config = cfg
        L, d, tr = int(s["modules"]), int(s["dim"]), int(s["true_rank"])
        if not 1 <= tr <= d:
            raise ValueError(f"linear.true_rank must lie in 1..dim ({d}); got {tr}")
        if cfg.rank > d:
            raise ValueError(f"rank must be <= linear.dim ({d}); got rank = {cfg.rank}")
        gen = torch.Generator().manual_seed(cfg.seed)
        alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
        self.model = torch.nn.ModuleDict({f"m{i}": _LoraLinear(d, d, cfg.rank, alpha, gen) for i in range(L)})
        self.scaling = alpha / cfg.rank
        sigma = s["scale"] * np.arange(1, tr + 1, dtype=float) ** (-s["decay"])
        self.target_delta = {}
        for name in self.model:
            U, _ = torch.linalg.qr(torch.randn(d, tr, generator=gen))
            V, _ = torch.linalg.qr(torch.randn(d, tr, generator=gen))
            self.target_delta[name] = (U * torch.as_tensor(sigma, dtype=torch.float32)) @ V.T
        self.spectrum = sigma
        K = cfg.clients
        self.client_scales = torch.exp(s["heterogeneity"] * torch.randn(K, d, generator=gen))
        self.xs, self.ys = [], []
        for k in range(K):
            x = torch.randn(int(s["samples"]), d, generator=gen) * self.client_scales[k].sqrt()
            self.xs.append(x)
            self.ys.append(self._teacher(x) + s["noise"] * torch.randn(len(x), L * d, generator=gen))
        self.client_indices = [np.arange(int(s["samples"])) for _ in range(K)]
        self.client_sizes = np.full(K, float(s["samples"]))
        mix = self.client_scales.mean(0).sqrt()
        self.x_test = torch.randn(int(s["test_samples"]), d, generator=gen) * mix
        self.y_test = self._teacher(self.x_test)
        self.flops_per_sample = 6.0 * L * d * d
        self._k = 0

    def _teacher(self, x):
        return torch.cat([x @ (m.weight + self.target_delta[n]).T for n, m in self.model.items()], dim=1)

    def factors(self):
        return {n: (m.lora_A, m.lora_B) for n, m in self.model.items()}

    def fold(self, name: str, delta: torch.Tensor) -> None:
        with torch.no_grad():
            self.model[name].weight.add_(delta.to(self.model[name].weight.dtype))

    def sample(self, k: int, batch_size: int, rng: np.random.Generator):
        take = np.sort(rng.choice(len(self.xs[k]), size=min(batch_size, len(self.xs[k])), replace=False))
        return self.xs[k][take], self.ys[k][take]

    def _predict(self, x):
        return torch.cat([m(x) for m in self.model.values()], dim=1)

    def loss(self, batch):
        x, y = batch
        return 0.5 * ((self._predict(x) - y) ** 2).sum(1).mean()

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        return float(0.5 * ((self._predict(self.x_test) - self.y_test) ** 2).sum(1).mean()), math.nan

    @torch.no_grad()
    def client_statistics(self, k: int, batch_size: int) -> tuple[float, float]:
        """At the live factors, client k's full-batch gradient norm² ‖∇f_k‖² and the variance of
        its minibatch gradient (``batch_size`` samples drawn without replacement, as the loop
        draws them) — in closed form from per-sample gradients γ e_i (A x_i)ᵀ and γ (Bᵀe_i) x_iᵀ."""
        x, y = self.xs[k].double(), self.ys[k].double()
        n, b = len(x), min(batch_size, len(x))
        per_sample, mean_sq, off = 0.0, 0.0, 0
        for m in self.model.values():
            d_out = m.weight.shape[0]
            A, B, g = m.lora_A.double(), m.lora_B.double(), m.scaling
            Ax = x @ A.T
            e = x @ m.weight.double().T + g * Ax @ B.T - y[:, off:off + d_out]
            off += d_out
            Bte = e @ B
            per_sample = per_sample + g**2 * ((e**2).sum(1) * (Ax**2).sum(1) + (Bte**2).sum(1) * (x**2).sum(1))
            mean_sq += float(((g * e.T @ Ax / n) ** 2).sum() + ((g * Bte.T @ x / n) ** 2).sum())
        var = (float(per_sample.mean()) - mean_sq) * (n - b) / (b * (n - 1)) if n > 1 else 0.0
        return mean_sq, max(var, 0.0)

    def objective(self, weights) -> tuple[float, float]:
        """The global training objective f(θ) = Σ_k p_k f_k(θ) (full batch, every client's data)
        at the live factors, and ‖∇f(θ)‖² over all LoRA factors (A and B)."""
        params = [p for pair in self.factors().values() for p in pair]
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        f = sum(float(w) * self.loss((x, y)) for w, x, y in zip(weights, self.xs, self.ys, strict=True))
        grads = torch.autograd.grad(f, params)
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        return float(f.detach()), float(sum((g.double() ** 2).sum() for g in grads))


def make_task(cfg: RunConfig) -> Task:
    if cfg.task == "rt-minilm":
        return RTMiniLMTask(cfg)
    return LinearTask(cfg)
