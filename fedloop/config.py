"""Run configuration: one validated dataclass, loadable from TOML, saved with every run."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from fedloop.strategies import (  # the strategy table (spec §8)
    DELTA_BROADCAST_STRATEGIES,
    SOFT_STRATEGIES,
    STRATEGIES,
    WIRE_STRATEGIES,
)

__all__ = ["RunConfig", "STRATEGIES", "TASKS", "HF_TASKS", "SOFT_STRATEGIES", "register_task", "task_names"]

#: The generic Hugging Face tasks (:mod:`fedloop.hf`), set up by the ``[hf]`` table.
HF_TASKS = ("hf-classification", "hf-causal-lm")
#: The built-in tasks; :func:`register_task` adds others.
TASKS = ("rt-minilm", "rt-distill", "linear") + HF_TASKS
#: Tasks added by :func:`register_task`: name -> factory(config) -> task.
REGISTERED_TASKS: dict[str, Any] = {}
#: The hf tasks' settings and defaults (``[hf]`` table); see :mod:`fedloop.hf`. None = unset.
HF_DEFAULTS = {"model": None, "tokenizer": None, "target_modules": None, "dataset": None, "test_dataset": None,
               "text_column": "text", "label_column": "label", "prompt_column": None, "client_split": None,
               "split_column": None, "head": None}
#: The devices a run may name: "auto" (a CUDA GPU when there is one, else the CPU), "cpu", "cuda", "cuda:N".
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]{1,3})?")
DTYPES = ("float32", "bfloat16")


def register_task(name: str, factory) -> None:
    """Make ``task = name`` build ``factory(config)``: a :class:`fedloop.tasks.Task` (the
    interface in that module's docstring) for a model or data a configuration cannot express.
    Registration is per process: a Flower app registers its tasks where its ServerApp and
    ClientApp are defined. A built-in name, a non-string name or a factory that is not
    callable is a ValueError; registering a name again replaces its factory."""
    if not isinstance(name, str) or not name.strip() or name in TASKS:
        raise ValueError(f"task name must be a non-empty string other than the built-in {TASKS}; got {name!r}")
    if not callable(factory):
        raise ValueError(f"factory must be callable (config -> Task); got {type(factory).__name__}")
    REGISTERED_TASKS[name] = factory


def task_names() -> tuple[str, ...]:
    """The built-in task names, then the registered ones."""
    return TASKS + tuple(REGISTERED_TASKS)


#: The linear task's settings and defaults (``[linear]`` table); see :class:`fedloop.tasks.LinearTask`.
LINEAR_DEFAULTS = {"modules": 2, "dim": 32, "true_rank": 4, "decay": 1.0, "scale": 1.0, "samples": 200, "noise": 0.1,
                   "heterogeneity": 0.5, "test_samples": 2000}
#: rt-distill's settings and defaults (``[distill]`` table); see :class:`fedloop.tasks.RTDistillTask`.
DISTILL_DEFAULTS = {"teacher_rank": 16, "decay": 0.0, "scale": 0.5, "subspace": 64, "classes": 10,
                    "examples": 3000, "teacher_seed": 0}
#: The largest integer (and magnitude) a setting may take: sizes and seeds beyond it are mistakes.
MAX_INT = 2**31 - 1
def _finite(v) -> bool:
    """math.isfinite that answers False (not OverflowError) for an integer beyond the float range."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False

#: For each table key: (integer?, lower bound, lower bound strict?).
_TABLE_RULES = {"modules": (True, 1, False), "dim": (True, 1, False), "true_rank": (True, 1, False),
                "samples": (True, 1, False), "test_samples": (True, 1, False), "decay": (False, 0, False),
                "scale": (False, 0, True), "noise": (False, 0, False), "heterogeneity": (False, 0, False),
                "teacher_rank": (True, 1, False), "subspace": (True, 1, False), "classes": (True, 1, False),
                "examples": (True, 1, False), "teacher_seed": (True, 0, False)}


def _check_table(table: str, values, defaults: dict) -> None:
    if not isinstance(values, dict):
        raise ValueError(f"{table} must be a table of settings; got {table} = {values!r}")
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {table} settings {unknown}; known: {sorted(defaults)}")
    for key, v in values.items():
        integer, low, strict = _TABLE_RULES[key]
        kind = "an integer" if integer else "a finite number"
        ok = not isinstance(v, bool) and isinstance(v, int if integer else (int, float)) and _finite(v) \
            and (v > low if strict else v >= low) and abs(v) <= MAX_INT
        if not ok:
            raise ValueError(f"{table}.{key} must be {kind} {'>' if strict else '>='} {low} and <= {MAX_INT}; "
                             f"got {table}.{key} = {v!r:.40}")


def _check_hf(values) -> None:
    """The ``[hf]`` table's form: known keys; paths, columns and split as strings; module lists as
    a list of strings or one comma-separated string. Whether paths exist and columns are in the
    data is checked when the task loads them (:mod:`fedloop.hf`)."""
    if not isinstance(values, dict):
        raise ValueError(f"hf must be a table of settings; got hf = {values!r:.60}")
    unknown = sorted(set(values) - set(HF_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown hf settings {unknown}; known: {sorted(HF_DEFAULTS)}")
    for key, v in values.items():
        if v is None:
            continue
        if key in ("target_modules", "head"):
            ok = isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) and x.strip() for x in v))
            if not ok:
                raise ValueError(f"hf.{key} must be a list of module names or one comma-separated string; "
                                 f"got hf.{key} = {v!r:.60}")
        elif not isinstance(v, str) or not v.strip():
            raise ValueError(f"hf.{key} must be a non-empty string; got hf.{key} = {v!r:.60}")
    split = values.get("client_split")
    if split is not None and split not in ("iid", "dirichlet", "column"):
        raise ValueError(f"hf.client_split must be 'iid', 'dirichlet' or 'column'; got hf.client_split = {split!r}")
    if (split == "column") != (values.get("split_column") is not None):
        raise ValueError("hf.split_column names the column to split by, and needs hf.client_split = 'column' "
                         f"(and the other way round); got client_split = {split!r}, "
                         f"split_column = {values.get('split_column')!r}")


@dataclass
class RunConfig:
    """Everything a run needs; every field has a default (the embedded demo settings).

    Task and data: ``task`` ("rt-minilm", "rt-distill", "linear", "hf-classification",
    "hf-causal-lm", or a name given to :func:`register_task`), ``clients`` K, ``split`` ("movie" or
    "dirichlet", rt-minilm), ``dirichlet_alpha``, ``test_fraction`` (held-out share),
    ``test_size`` (evaluated examples, 0 = all), ``max_length`` (tokens), ``train_head``
    (rt-minilm: train the classification head with the adapter; False freezes it at its
    seeded initialisation so only the adapter learns), ``distill`` (rt-distill's settings,
    see :class:`fedloop.tasks.RTDistillTask`), ``linear`` (the linear task's), ``hf`` (the hf
    tasks': model and data paths, columns, target modules, client split, head; :mod:`fedloop.hf`).
    Device: ``device`` ("cpu", "auto": a CUDA GPU when one is available, else the CPU; "cuda",
    "cuda:N"; rt-minilm and the hf tasks, the others run on the CPU) and ``dtype`` of the base
    model ("float32", or "bfloat16" for the hf tasks; the adapter and the head train in float32
    where the model allows, and what travels is float32 either way).
    LoRA and training: ``rank`` r, ``alpha`` (None = r), ``local_steps`` E, ``batch_size``,
    ``lr`` (LoRA factors), ``head_lr`` (the dense head, AdamW), ``optimizer`` ("auto":
    TensorwiseAdam for SOFT strategies, AdamW otherwise;
    or "adamw", "tadam", "sgd"), ``momentum`` (sgd's; 0 gives the plain SGD the bound
    of docs/theory.md analyses), ``penalty`` λ of R_orth (None = 0.01 for SOFT strategies,
    0 otherwise), ``reorthogonalize`` (None = on for SOFT strategies).
    Strategy: ``strategy`` (see STRATEGIES; ``head`` keeps the adapter frozen and sends only
    the other trainable parameters; ``lowrank`` is dense ``fedit`` at structural rank
    ``keep``: the bits of keeping ``keep`` of r components spent on a smaller adapter;
    ``flasc`` is ``topk`` in both directions: the server broadcasts the largest entries of the
    global adapter's change at the same bit budget, FLASC-style),
    ``keep`` (components per module for fixed, random, svd, lowrank, topk's and flasc's bit budget),
    ``scope`` ("module" or "global" SOFT selection).
    Communication: ``value_bits`` q, the precision of every uploaded value (32 float32, 16
    float16, 8 or 4: integers with a scale per component and unbiased stochastic rounding,
    ``soft.quantise``; the SOFT wire strategies, and ``topk`` at 32 or 16), or ``"auto"``
    (``tsfa``, in process): the allocator chooses q ∈ {32, 16, 8, 4} for each client and round
    with its keep count, pricing the rounding error the client reports (``soft.rounding_profile``);
    ``error_feedback`` ("none"; "rotated": each client keeps what it did not send, the dropped
    components and the rounding residual, or its whole update when it is not scheduled, and
    adds it to its next update, re-expressed in the basis of the server's
    re-orthogonalisation; "fixed": the same without re-expressing it; on Flower the residual
    lives in each node's state);
    ``downlink_value_bits`` (None: the server broadcasts the whole global adapter in float32;
    32, 16, 8 or 4: the clients hold their view of the adapter and the server broadcasts SOFT's
    payload of (global − view) at that precision, 8 and 4 with stochastic rounding, keeping what
    it did not send for later rounds) and ``downlink_keep`` (the components per module that
    broadcast carries, those whose change is largest; None = all r).
    Wireless (spec §2, §9): ``bandwidth_hz``, ``budget_factor`` (τ̄ = factor × median dense
    latency, so dense uploads do not fit when < 1), ``latency_budget_s`` (overrides),
    ``relative_v`` the scale-free V (error profiles are divided by the round's mean dense update
    energy and V is multiplied by τ̄², so the drift-plus-penalty objective over τ̄² reads
    V·Σ p_k e_k,rel + (Q/τ̄)(τ/τ̄)), ``cap_factor`` (hard cap τ_max = factor × τ̄, None = none),
    ``allow_skip``, ``drift`` ("exact": each round minimises V·penalty + ½Q(t+1)², the exact
    one-step drift-plus-penalty, which does not alternate between uploading everything and
    skipping; "linear": the usual V·penalty + Q·τ; see :class:`tsfa.allocator.OnlineAllocator`),
    ``initial_queue`` (the allocator's Q(0) in seconds, or "auto": the price at which the first
    round meets τ̄),
    ``flops_per_s_scale`` (scales device speeds), ``deadline_factor``
    (a client finishing after factor × τ̄ misses the round; None = never),
    ``reject_norm_factor`` (the server rejects a SOFT update whose norm exceeds factor × the
    round's median norm, recorded as ``rejected: ...``; None = no norm rule).
    Run: ``rounds``, ``seed``, ``eval_every``, ``checkpoint_every``, ``out`` (run folder),
    ``predict_every`` (every N rounds the run re-calibrates its loss curve on its own history,
    ``convergence.predict_from``, and each later round records the predicted loss, its 90 %
    band and ``outside_band``; 0 = off; needs ``eval_every`` = 1).
    """

    task: str = "rt-minilm"
    strategy: str = "tsfa"
    rounds: int = 10
    clients: int = 10
    seed: int = 0
    rank: int = 8
    alpha: float | None = None
    keep: int = 2
    scope: str = "module"
    value_bits: int | str = 32
    error_feedback: str = "none"
    downlink_value_bits: int | None = None
    downlink_keep: int | None = None
    local_steps: int = 4
    batch_size: int = 16
    lr: float = 2e-3
    head_lr: float = 1e-2
    optimizer: str = "auto"
    momentum: float = 0.9
    penalty: float | None = None
    reorthogonalize: bool | None = None
    split: str = "movie"
    dirichlet_alpha: float = 0.5
    test_fraction: float = 0.1
    test_size: int = 600
    max_length: int = 48
    train_head: bool = True
    bandwidth_hz: float = 20e6
    budget_factor: float = 0.5
    latency_budget_s: float | None = None
    relative_v: float = 1.0
    cap_factor: float | None = 3.0
    allow_skip: bool = True
    drift: str = "exact"
    initial_queue: float | str = 0.0
    deadline_factor: float | None = None
    reject_norm_factor: float | None = None
    eval_every: int = 1
    checkpoint_every: int = 5
    predict_every: int = 5
    out: str = "runs/run"
    device: str = "cpu"
    dtype: str = "float32"
    linear: dict = field(default_factory=dict)
    distill: dict = field(default_factory=dict)
    hf: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    # -- resolved settings ---------------------------------------------------------------
    @property
    def uses_soft(self) -> bool:
        return self.strategy in SOFT_STRATEGIES

    @property
    def value_bits_menu(self) -> tuple[int, ...]:
        """The precisions the allocator chooses among (``value_bits = "auto"``), else ()."""
        return (32, 16, 8, 4) if self.value_bits == "auto" else ()

    @property
    def base_value_bits(self) -> int:
        """q of a payload whose precision is not chosen per round: ``value_bits``, 32 for "auto"."""
        return 32 if self.value_bits == "auto" else int(self.value_bits)

    @property
    def resolved_optimizer(self) -> str:
        if self.optimizer != "auto":
            return self.optimizer
        return "tadam" if self.uses_soft else "adamw"

    @property
    def resolved_penalty(self) -> float:
        if self.penalty is not None:
            return float(self.penalty)
        return 0.01 if self.uses_soft else 0.0

    @property
    def resolved_reorthogonalize(self) -> bool:
        return self.uses_soft if self.reorthogonalize is None else bool(self.reorthogonalize)

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"{name} {why}; got {name} = {getattr(self, name)!r}")

        if not isinstance(self.task, str) or self.task not in task_names():
            bad("task", f"must be one of {task_names()} (fedloop.register_task adds others)")
        if self.strategy not in STRATEGIES:
            bad("strategy", f"must be one of {STRATEGIES}")
        for name in ("rounds", "clients", "rank", "local_steps", "batch_size", "eval_every", "checkpoint_every",
                     "max_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_INT:
                bad(name, f"must be an integer in 1..{MAX_INT}")
        for name in ("seed", "test_size", "predict_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_INT:
                bad(name, f"must be an integer in 0..{MAX_INT}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or not 1 <= self.keep <= self.rank:
            bad("keep", f"must be an integer in 1..rank ({self.rank})")
        if self.scope not in ("module", "global"):
            bad("scope", "must be 'module' or 'global'")
        if isinstance(self.value_bits, bool) or self.value_bits not in (32, 16, 8, 4, "auto"):
            bad("value_bits", "must be 32, 16, 8, 4 or 'auto'")
        if self.value_bits == "auto" and (self.strategy != "tsfa" or self.scope != "module"):
            bad("value_bits", "'auto' (the allocator chooses) applies to strategy = 'tsfa' with scope = 'module'")
        if self.value_bits not in (32, "auto") and self.strategy not in WIRE_STRATEGIES + ("topk", "flasc"):
            bad("value_bits", f"below 32 applies to {', '.join(WIRE_STRATEGIES)}, topk and flasc")
        if self.base_value_bits < 16 and (self.strategy in ("topk", "flasc") or self.scope == "global"):
            bad("value_bits", "8 and 4 need per-module SOFT payloads (not topk, not scope = 'global')")
        if self.error_feedback not in ("none", "rotated", "fixed"):
            bad("error_feedback", "must be 'none', 'rotated' or 'fixed'")
        if self.error_feedback != "none" and self.strategy not in WIRE_STRATEGIES + ("topk", "flasc"):
            bad("error_feedback", f"applies to {', '.join(WIRE_STRATEGIES)}, topk and flasc")
        dq, dk = self.downlink_value_bits, self.downlink_keep
        if dq is not None and (isinstance(dq, bool) or dq not in (32, 16, 8, 4)):
            bad("downlink_value_bits", "must be None (the whole adapter) or 32, 16, 8, 4")
        if dq is not None and self.strategy not in DELTA_BROADCAST_STRATEGIES:
            bad("downlink_value_bits", f"applies to {', '.join(DELTA_BROADCAST_STRATEGIES)} (flasc has its own "
                "sparse broadcast; ideal and svd also change the frozen weights; head sends no adapter)")
        if dk is not None and (isinstance(dk, bool) or not isinstance(dk, int)
                               or not 1 <= dk <= self.structural_rank or dq is None):
            bad("downlink_keep", f"must be None or an integer in 1..{self.structural_rank} (the adapter's rank), "
                "with downlink_value_bits set")
        if self.optimizer not in ("auto", "adamw", "tadam", "sgd"):
            bad("optimizer", "must be 'auto', 'adamw', 'tadam' or 'sgd'")
        if isinstance(self.momentum, bool) or not isinstance(self.momentum, (int, float)) or not 0 <= self.momentum < 1:
            bad("momentum", "must be a number in [0, 1)")
        if self.split not in ("movie", "dirichlet"):
            bad("split", "must be 'movie' or 'dirichlet'")
        positive = ("lr", "head_lr", "bandwidth_hz", "budget_factor", "relative_v", "dirichlet_alpha")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v) or v <= 0:
                bad(name, "must be a finite number > 0")
        rn = self.reject_norm_factor
        if rn is not None and (isinstance(rn, bool) or not isinstance(rn, (int, float)) or not _finite(rn)
                               or rn <= 1):
            bad("reject_norm_factor", "must be None or a finite number > 1")
        for name in ("alpha", "latency_budget_s", "cap_factor", "deadline_factor"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v)
                                  or v <= 0):
                bad(name, "must be None or a finite number > 0")
        if self.drift not in ("exact", "linear"):
            bad("drift", "must be 'exact' or 'linear'")
        q0 = self.initial_queue
        if not (q0 == "auto" or (isinstance(q0, (int, float)) and not isinstance(q0, bool) and _finite(q0)
                                 and q0 >= 0)):
            bad("initial_queue", "must be 'auto' or a finite number >= 0")
        if self.penalty is not None and (isinstance(self.penalty, bool) or not isinstance(self.penalty, (int, float))
                                         or not _finite(self.penalty) or self.penalty < 0):
            bad("penalty", "must be None or a finite number >= 0")
        tf = self.test_fraction
        if isinstance(tf, bool) or not isinstance(tf, (int, float)) or not 0 < tf < 1:
            bad("test_fraction", "must be a number in (0, 1)")
        if not isinstance(self.out, str) or not self.out.strip():
            bad("out", "must be a non-empty path of the run folder")
        for name in ("allow_skip", "train_head"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be true or false")
        if self.reorthogonalize is not None and not isinstance(self.reorthogonalize, bool):
            bad("reorthogonalize", "must be None, true or false")
        _check_table("linear", self.linear, LINEAR_DEFAULTS)
        _check_table("distill", self.distill, DISTILL_DEFAULTS)
        _check_hf(self.hf)
        if self.task in HF_TASKS:
            for key in ("model", "dataset"):
                if self.hf.get(key) is None:
                    raise ValueError(f"task {self.task!r} needs hf.{key} (a path); got hf = {self.hf!r:.120}")
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            bad("device", "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.dtype not in DTYPES:
            bad("dtype", f"must be one of {DTYPES}")
        if self.task in ("linear", "rt-distill") and self.device not in ("auto", "cpu"):
            bad("device", f"must be 'cpu' or 'auto' for task {self.task!r}, which runs on the CPU")
        if self.dtype != "float32" and self.task in ("linear", "rt-distill", "rt-minilm"):
            bad("dtype", f"must be 'float32' for task {self.task!r} (bfloat16 applies to {', '.join(HF_TASKS)} "
                "and registered tasks)")
        for name in ("split", "scope", "optimizer", "drift", "task", "strategy", "error_feedback", "device", "dtype"):
            if not isinstance(getattr(self, name), str):
                bad(name, "must be a string")

    @property
    def compressed_downlink(self) -> bool:
        """The clients hold a lagging view of the adapter, updated by compressed broadcasts
        (``flasc``, or ``downlink_value_bits`` set)."""
        return self.strategy == "flasc" or self.downlink_value_bits is not None

    @property
    def structural_rank(self) -> int:
        """The adapter's rank as built: ``keep`` for ``lowrank``, ``rank`` otherwise."""
        return self.keep if self.strategy == "lowrank" else self.rank

    # -- I/O ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_toml(cls, path) -> RunConfig:
        """Read a TOML file whose top-level keys are the field names (a ``[linear]`` table
        sets the linear task's parameters)."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise ValueError(f"{p}: not valid TOML: {str(exc) or type(exc).__name__}") from None
        return cls.from_dict(data)

    def replace(self, **changes) -> RunConfig:
        """A copy with ``changes`` (validated); an unknown field is a ValueError naming it."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        return dataclasses.replace(self, **changes)
