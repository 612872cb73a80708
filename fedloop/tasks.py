"""Tasks: a model with LoRA factors, client datasets and an evaluation set (spec §10).

Every task exposes the same small interface to the loop:

* ``factors()`` — the live LoRA factors {name: (A, B)} (A r×n, B m×r);
* ``head()`` — other trainable parameters, sent dense (the classification head);
* ``scaling`` — γ = α/r, the adapter is γ·B·A; ``fold(name, delta)`` adds ``delta`` (m×n)
  to a frozen weight (used by the ``ideal`` and ``svd`` strategies);
* ``lora_shape()`` — the adapter's :class:`tsfa.LoraShape`, what the allocator and the codec price;
* ``client_sizes`` and ``batch(k, indices)`` / ``sample(k, batch_size, rng)``;
* ``loss(batch)`` (a scalar tensor) and ``evaluate()`` → (test loss, accuracy or NaN);
  ``ledger_metrics(test_loss, accuracy)`` → further ledger columns (e.g. perplexity);
* ``flops_per_sample`` for the compute-time model.

One model is shared by all simulated clients: the loop swaps adapters in and out, so
memory grows with K adapters, not with K models. The model may live on a GPU
(``RunConfig.device``); ``assign`` copies into it from anywhere, and the loop keeps its own
copies of factors and heads as float32 CPU tensors (the wire format reads them).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from fedloop import data as fd
from fedloop.config import DISTILL_DEFAULTS, HF_TASKS, LINEAR_DEFAULTS, REGISTERED_TASKS, RunConfig

__all__ = ["Task", "PeftTask", "RTMiniLMTask", "RTDistillTask", "LinearTask", "make_task", "resolve_device",
           "DISTILL_DEFAULTS"]


class Task:
    name = "task"

    def factors(self) -> dict:
        raise NotImplementedError

    def head(self) -> dict:
        return {}

    def assign(self, factors: dict, head: dict | None = None) -> None:
        """Copy ``factors`` {name: (A, B)} (and ``head`` {name: tensor}) into the model's live weights."""
        with torch.no_grad():
            for name, (A, B) in self.factors().items():
                A.copy_(factors[name][0])
                B.copy_(factors[name][1])
            for name, p in (self.head() if head is not None else {}).items():
                p.copy_(head[name])

    def sample(self, k: int, batch_size: int, rng: np.random.Generator):
        idx = self.client_indices[k]
        take = rng.choice(len(idx), size=min(batch_size, len(idx)), replace=False)
        return self.batch(idx[np.sort(take)])

    def ledger_metrics(self, test_loss: float, accuracy: float) -> dict:
        """Further ledger columns from an evaluation (hf-causal-lm: perplexity); none by default."""
        return {}

    def lora_shape(self):
        """The adapter's :class:`tsfa.LoraShape` (32-bit values, SOFT's header): the shapes of the
        factors by default."""
        import soft

        return soft.shape_of(self.factors())

    def train(self):
        self.model.train()

    def eval(self):
        self.model.eval()


def resolve_device(name: str) -> torch.device:
    """The torch device a config's ``device`` names: "auto" is the first CUDA GPU when one is
    available, else the CPU; "cuda" or "cuda:N" without that GPU is a ValueError naming it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            found = f"{count} CUDA GPU(s)" if count else f"no CUDA GPU (torch {torch.__version__})"
            raise ValueError(f"device = {name!r} but this machine has {found}; use device = 'auto' or 'cpu'")
    return torch.device(name)


class PeftTask(Task):
    """A task on a peft model (``self.model``) on ``self.device``: the LoRA factors, the head
    (the other trainable parameters), γ and ``fold`` read from the model's LoRA modules, and the
    payload shape from them (:meth:`tsfa.LoraShape.from_model`). Subclasses build the model
    and call :meth:`adopt`; their ``batch`` returns tensors on ``self.device``."""

    def adopt(self, model, device: torch.device) -> None:
        self.model, self.device = model, device
        self._factors = fd.get_lora_factors(model)
        self._head = fd.head_parameters(model)
        first = next(m for m in model.modules() if hasattr(m, "scaling") and hasattr(m, "lora_A"))
        self.scaling = float(first.scaling["default"])
        self._adapted = dict(self._lora_modules())

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

    def lora_shape(self):
        from tsfa.model import LoraShape

        return LoraShape.from_model(self.model)

    def fold(self, name: str, delta: torch.Tensor) -> None:
        mod = self._adapted[name]
        weight = mod.base_layer.weight  # GPT-2's Conv1D stores it transposed (peft's fan_in_fan_out)
        with torch.no_grad():
            weight.add_((delta.T if getattr(mod, "fan_in_fan_out", False) else delta).to(weight.device, weight.dtype))


class RTMiniLMTask(PeftTask):
    """all-MiniLM-L6-v2 + peft LoRA on query/value, sentiment of Rotten Tomatoes snippets."""

    name = "rt-minilm"
    cpu_only = False  # rt-distill's teacher targets stay on the CPU

    def __init__(self, cfg: RunConfig, *, examples=None, num_labels: int = 2, train_head: bool = True):
        rt = fd.load_rotten_tomatoes()
        pool = np.arange(len(rt.texts)) if examples is None else np.asarray(examples)
        train, test = (pool[i] for i in fd.train_test_split(len(pool), cfg.test_fraction, cfg.seed))
        if cfg.split == "movie":
            parts = fd.split_by_movie(rt.movies, cfg.clients, cfg.seed, indices=train)
        else:
            parts = fd.split_dirichlet(rt.labels, cfg.clients, cfg.dirichlet_alpha, cfg.seed, indices=train)
        self.client_indices = [np.asarray(p) for p in parts]
        self.client_sizes = np.array([len(p) for p in parts], dtype=float)
        self.test_indices = test[: cfg.test_size] if cfg.test_size else test
        device = torch.device("cpu") if self.cpu_only else resolve_device(cfg.device)
        model, tok = fd.build_minilm_lora(cfg.structural_rank, alpha=cfg.alpha, seed=cfg.seed,
                                          num_labels=num_labels, train_head=cfg.train_head and train_head)
        self.adopt(model.to(device), device)
        enc = fd.tokenize(tok, list(rt.texts), cfg.max_length)
        self.tokenizer = tok
        self.input_ids, self.attention_mask = enc["input_ids"], enc["attention_mask"]
        self.labels = torch.tensor(rt.labels)
        n_params = sum(p.numel() for p in self.model.parameters())
        self.flops_per_sample = 6.0 * n_params * cfg.max_length

    def batch(self, idx):
        idx = torch.as_tensor(np.asarray(idx))
        return tuple(t[idx].to(self.device) for t in (self.input_ids, self.attention_mask, self.labels))

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


#: rt-distill's settings (``RunConfig.distill``) and their defaults.


class RTDistillTask(RTMiniLMTask):
    """Distillation from a realisable teacher on real review text: the discriminating testbed.

    The teacher is all-MiniLM-L6-v2 with a rank-R update ΔW = U diag(σ) Pᵀ added to each of
    the 12 query and value weights (R = ``teacher_rank``). Its input directions are spread
    over what the module actually sees: P = E Λ^(−1/2) Q, with E, Λ the top ``subspace``
    principal directions and variances of the module's input tokens (measured on the base
    model) and Q a random orthonormal R-frame of that subspace, so each of the R components
    changes the module's output by an independent unit-variance signal scaled by
    σ_i = ``scale`` · ρ · i^(−``decay``) / ‖(j^(−decay))_j‖, where ρ² is the module's output
    energy per token (the update's output energy is ``scale``² times the original's). With
    random input directions instead, the anisotropy of BERT's hidden states folds any
    teacher into an effective rank of one or two, and rank stops mattering. U is a random
    orthonormal frame; everything is drawn from ``teacher_seed``, the same for every run seed.

    The student is the same pre-trained model with LoRA of rank r on the same modules and no
    trainable head: the adapter carries all the learning, F* = 0, and ``spectrum`` (σ per
    component, in output-RMS units) says what a rank-r adapter cannot represent.

    Loss: the teacher's last hidden states as per-token targets, ‖s(x)_j − t(x)_j‖² summed
    over features and averaged over real tokens, divided by D₀ (the same quantity between
    the base model and the teacher on the test set), so the test loss starts at 1 and is
    the share of the teacher's change still missing. ``accuracy``: the share of test snippets
    on which a fixed random ``classes``-way linear head over the mean-pooled embedding
    gives the student and the teacher the same class (teacher agreement).

    Data: ``examples`` review snippets drawn once from the 12,808 by ``teacher_seed``, split
    into train and test by the run seed and over clients by movie (or Dirichlet). The
    teacher's outputs are computed once per process in fixed blocks, so they do not depend
    on which runs asked for them first (resume stays exact).
    """

    name = "rt-distill"
    cpu_only = True

    def __init__(self, cfg: RunConfig):
        s = {**DISTILL_DEFAULTS, **cfg.distill}  # types and ranges validated by RunConfig
        if not s["teacher_rank"] <= s["subspace"] <= 384:
            raise ValueError(f"distill.subspace must lie in teacher_rank..384; got {s['subspace']}")
        n_all = len(fd.load_rotten_tomatoes().texts)
        if not 2 <= s["examples"] <= n_all:
            raise ValueError(f"distill.examples must lie in 2..{n_all}; got {s['examples']}")
        self.settings = s
        examples = np.sort(np.random.default_rng(s["teacher_seed"]).choice(n_all, s["examples"], replace=False))
        super().__init__(cfg, examples=examples, num_labels=s["classes"], train_head=False)
        teacher = _distill_teacher(s["teacher_rank"], float(s["decay"]), float(s["scale"]), s["subspace"],
                                   s["classes"], s["teacher_seed"], cfg.max_length, tuple(int(i) for i in examples))
        self.spectrum = teacher.sigma
        self._teacher = teacher
        with torch.no_grad():  # the agreement head is the teacher's, whatever the run seed
            head = self.model.base_model.model.classifier
            head.weight.copy_(teacher.head_weight)
            head.bias.zero_()
        test = self.test_indices
        self.normaliser = float(self._distance(teacher.base_hidden(test), teacher.hidden(test),
                                               self.attention_mask[torch.as_tensor(test)]))

    @staticmethod
    def _distance(h, target, mask, reduce=True):
        m = mask.unsqueeze(-1).to(h.dtype)
        per_token = (((h - target) * m) ** 2).sum((1, 2))
        return per_token.sum() / m.sum() if reduce else (per_token, m.sum())

    def batch(self, idx):
        ids, mask, _ = super().batch(idx)
        return ids, mask, self._teacher.hidden(idx)

    def _hidden(self, ids, mask):
        return self.model.base_model.model.bert(input_ids=ids, attention_mask=mask).last_hidden_state

    def loss(self, batch):
        ids, mask, target = batch
        return self._distance(self._hidden(ids, mask), target, mask) / self.normaliser

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        self.model.eval()
        total, tokens, agree, n = 0.0, 0.0, 0, 0
        for i in range(0, len(self.test_indices), 128):
            ids, mask, target = self.batch(self.test_indices[i:i + 128])
            h = self._hidden(ids, mask)
            d, m = self._distance(h, target, mask, reduce=False)
            total, tokens = total + float(d.sum()), tokens + float(m)
            agree += int((self._teacher.classify(h, mask) == self._teacher.classify(target, mask)).sum())
            n += len(ids)
        return total / tokens / self.normaliser, agree / n


class _Teacher:
    """The rt-distill teacher's last hidden states on a fixed set of snippets (see :class:`RTDistillTask`);
    ``factors[name] = (A, B)``: its update B·A of each adapted weight, as LoRA factors of rank R."""

    BLOCK = 256

    def __init__(self, rank, decay, scale, subspace, classes, seed, max_length, examples):
        rt = fd.load_rotten_tomatoes()
        self.encoder, tokenizer = fd.load_minilm_encoder()
        enc = fd.tokenize(tokenizer, [rt.texts[i] for i in examples], max_length)
        self.row = {int(i): j for j, i in enumerate(examples)}
        self.ids, self.mask = enc["input_ids"], enc["attention_mask"]
        gen = torch.Generator().manual_seed(seed)
        hidden = self.encoder.config.hidden_size
        self.head_weight = torch.randn(classes, hidden, generator=gen)
        modules = {name: mod for name, mod in self.encoder.named_modules()
                   if name.endswith(("attention.self.query", "attention.self.value"))}
        inputs = self._input_covariances(modules, min(512, len(examples)))
        profile = np.arange(1, rank + 1, dtype=float) ** (-decay)
        profile /= np.linalg.norm(profile)
        self.base_weights, self.factors, sigma = {}, {}, []
        with torch.no_grad():
            for name, mod in modules.items():
                cov = inputs[name]
                lam, E = torch.linalg.eigh(cov)
                lam, E = lam.flip(0)[:subspace].clamp_min(1e-12), E.flip(1)[:, :subspace]
                Q, _ = torch.linalg.qr(torch.randn(subspace, rank, generator=gen, dtype=torch.float64))
                U, _ = torch.linalg.qr(torch.randn(mod.weight.shape[0], rank, generator=gen, dtype=torch.float64))
                W = mod.weight.detach().double()
                rho = float(torch.sqrt(torch.trace(W @ cov @ W.T)))
                s = scale * rho * profile
                P = E @ (Q / lam.sqrt()[:, None])
                self.base_weights[name] = mod.weight.detach().clone()
                self.factors[name] = (P.T.float(), (U * torch.as_tensor(s)).float())  # (A R×n, B m×R)
                mod.weight.add_(self.factors[name][1] @ self.factors[name][0])
                sigma.append(s)
        self.sigma = np.array(sigma)
        self.targets = self._run(np.arange(len(examples)))

    def _input_covariances(self, modules, n):
        """Second moments of every adapted module's input tokens (real tokens only), on the
        first ``n`` snippets, in float64."""
        sums = {name: torch.zeros(self.encoder.config.hidden_size, self.encoder.config.hidden_size,
                                  dtype=torch.float64) for name in modules}
        count = [0.0]
        mask_now = {}

        def hook(name):
            def fn(mod, args):
                x = args[0].double()[mask_now["m"]]
                sums[name].add_(x.T @ x)
            return fn

        handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in modules.items()]
        try:
            with torch.no_grad():
                for i in range(0, n, self.BLOCK):
                    ids, mask = self.ids[i:min(i + self.BLOCK, n)], self.mask[i:min(i + self.BLOCK, n)]
                    mask_now["m"] = mask.bool()
                    self.encoder(input_ids=ids, attention_mask=mask)
                    count[0] += float(mask.sum())
        finally:
            for h in handles:
                h.remove()
        return {name: v / count[0] for name, v in sums.items()}

    @torch.no_grad()
    def _run(self, rows) -> torch.Tensor:
        self.encoder.eval()
        out = []
        for i in range(0, len(rows), self.BLOCK):
            r = torch.as_tensor(rows[i:i + self.BLOCK])
            out.append(self.encoder(input_ids=self.ids[r], attention_mask=self.mask[r]).last_hidden_state)
        return torch.cat(out)

    def hidden(self, indices) -> torch.Tensor:
        """The teacher's last hidden states of the given examples (snippet indices)."""
        return self.targets[torch.as_tensor([self.row[int(i)] for i in np.asarray(indices)])]

    @torch.no_grad()
    def base_hidden(self, indices) -> torch.Tensor:
        """The base model's last hidden states (the teacher without its update)."""
        modules = dict(self.encoder.named_modules())
        saved = {name: modules[name].weight.detach().clone() for name in self.base_weights}
        try:
            for name, w in self.base_weights.items():
                modules[name].weight.copy_(w)
            return self._run(np.array([self.row[int(i)] for i in np.asarray(indices)]))
        finally:
            for name, w in saved.items():
                modules[name].weight.copy_(w)

    def classify(self, hidden, mask) -> torch.Tensor:
        """The fixed random head's class of each snippet's mean-pooled embedding."""
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        return (pooled @ self.head_weight.T).argmax(-1)


@functools.lru_cache(maxsize=1)
def _distill_teacher(rank, decay, scale, subspace, classes, seed, max_length, examples) -> _Teacher:
    return _Teacher(rank, decay, scale, subspace, classes, seed, max_length, examples)


class _LoraLinear(torch.nn.Module):
    """y = (W0 + γ B A) x with W0 frozen; A Kaiming-uniform, B = 0 (peft's initialisation)."""

    def __init__(self, m: int, n: int, r: int, alpha: float, gen: torch.Generator, draw_rank: int | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(m, n, generator=gen) / math.sqrt(n), requires_grad=False)
        bound = 1.0 / math.sqrt(n)
        # A's first r rows of a draw_rank × n draw: the generator advances the same for every
        # structural rank, so the task's data do not depend on it (paired ``lowrank`` runs).
        draw = torch.rand(max(r, draw_rank or r), n, generator=gen)
        self.lora_A = torch.nn.Parameter(((draw * 2 - 1) * bound)[:r].clone())
        self.lora_B = torch.nn.Parameter(torch.zeros(m, r))
        self.scaling = alpha / r

    def forward(self, x):
        return x @ self.weight.T + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T


class LinearTask(Task):
    """Linear teacher–student regression with a chosen target spectrum (spec §10).

    Settings (``RunConfig.linear``): ``modules`` (2), ``dim`` (m = n = 32), ``true_rank``
    (4), ``decay`` (1.0: the target update of every module has singular values
    σ_i = scale · i^(−decay), i ≤ true_rank), ``scale`` (1.0), ``samples`` per client (200),
    ``noise`` (0.1), ``heterogeneity`` (0.5: client k's inputs have covariance
    diag(exp(h·z_k)) with z_k standard normal per coordinate). The student is W0 + γBA per
    module with W0 the teacher's frozen part; the loss is ½‖ŷ − y‖² averaged over samples.
    """

    name = "linear"

    def __init__(self, cfg: RunConfig):
        s = {**LINEAR_DEFAULTS, **cfg.linear}  # validated by RunConfig
        self.settings = s
        self.config = cfg
        L, d, tr = int(s["modules"]), int(s["dim"]), int(s["true_rank"])
        if not 1 <= tr <= d:
            raise ValueError(f"linear.true_rank must lie in 1..dim ({d}); got {tr}")
        r = cfg.structural_rank
        if r > d:
            raise ValueError(f"rank must be <= linear.dim ({d}); got rank = {r}")
        gen = torch.Generator().manual_seed(cfg.seed)
        alpha = cfg.alpha if cfg.alpha is not None else r
        self.model = torch.nn.ModuleDict({f"m{i}": _LoraLinear(d, d, r, alpha, gen, cfg.rank) for i in range(L)})
        self.scaling = alpha / r
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
    """The task ``cfg.task`` names: a built-in one, or one added by :func:`fedloop.register_task`."""
    if cfg.task in REGISTERED_TASKS:
        return REGISTERED_TASKS[cfg.task](cfg)
    if cfg.task in HF_TASKS:
        from fedloop import hf

        return hf.make_hf_task(cfg)
    return {"rt-minilm": RTMiniLMTask, "rt-distill": RTDistillTask, "linear": LinearTask}[cfg.task](cfg)
