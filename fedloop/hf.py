"""Your own model and data: the generic Hugging Face tasks ``hf-classification`` and ``hf-causal-lm``.

The ``[hf]`` table of a :class:`~fedloop.RunConfig` names everything (docs/tasks.md):

* ``model``: a local directory that ``AutoModelForSequenceClassification`` (classification) or
  ``AutoModelForCausalLM`` (causal LM) loads, weights as safetensors (nothing is unpickled);
  ``tokenizer``: another directory for the tokenizer (default: the model's);
* ``target_modules``: the layers LoRA adapts (peft's names, e.g. ``["q_proj", "v_proj"]``;
  default: peft's choice for the architecture); linear layers only (GPT-2's ``Conv1D`` too);
* ``head``: modules that train and travel dense besides the adapter (default: the
  classifier, ``classifier`` or ``score``, for classification; none for causal LM);
* ``dataset``: a CSV, JSONL or Parquet file (or ``module:function`` returning
  ``{"train": rows, "test": rows}``, rows a list of dicts or a dict of columns);
  ``test_dataset``: a held-out file (default: ``test_fraction`` of ``dataset``);
  ``text_column`` ("text"), ``label_column`` ("label", classification; integers or strings,
  classes numbered in sorted order, ``num_labels`` from the data), ``prompt_column``
  (causal LM: prompt tokens are fed but not scored);
* ``client_split``: "dirichlet" over labels (``dirichlet_alpha``; the default for
  classification), "iid" (the default for causal LM) or "column" (whole groups of
  ``split_column`` per client).

Texts are tokenised once to ``max_length`` tokens. Classification: cross-entropy, metric
accuracy. Causal LM: next-token cross-entropy over the text's real tokens; the test loss is
the mean per token and the ledger's ``perplexity`` its exponential. One base model (on
``device``, in ``dtype``) serves all simulated clients. Every setting is checked before use: a
missing path, a column that is not in the data, a target module the model lacks is one
ValueError naming the setting and its value.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from fedloop import data as fd
from fedloop.config import HF_DEFAULTS, RunConfig
from fedloop.tasks import PeftTask, resolve_device

__all__ = ["HFClassificationTask", "HFCausalLMTask", "make_hf_task", "load_rows"]

_FUNCTION = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_LAYERS = ("Linear", "Conv1D")  # what SOFT's (A r×n, B m×r) factors adapt


def _names(value) -> list[str] | None:
    """A module list from the config: a list, one comma-separated string, or None (default)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    return [s.strip() for s in items if s.strip()]


# ----------------------------------------------------------------------------- data files


def _read_file(path: Path, setting: str) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as fh:
                return list(csv.DictReader(fh))
        if suffix in (".jsonl", ".json"):
            rows = []
            with open(path, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        row = json.loads(line)
                        if not isinstance(row, dict):
                            raise ValueError(f"line {n} is not a JSON object")
                        rows.append(row)
            return rows
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ValueError(f"{setting} = {str(path)!r}: reading Parquet needs pyarrow: "
                                 "pip install 'tsfa[parquet]'") from None
            return pq.read_table(path).to_pylist()
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error, ValueError, OSError) as exc:
        raise ValueError(f"{setting} = {str(path)!r}: not a readable {suffix[1:]} file: {exc}") from None
    raise ValueError(f"{setting} = {str(path)!r}: the file must end in .csv, .jsonl or .parquet")


def _rows(value, setting: str) -> list[dict]:
    """Rows as a list of dicts, from a list of dicts or a dict of equally long columns."""
    if isinstance(value, dict):
        columns = {k: list(v) for k, v in value.items()}
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"{setting}: the columns have different lengths {sorted(lengths)}")
        return [dict(zip(columns, vals, strict=True)) for vals in zip(*columns.values(), strict=True)]
    if isinstance(value, (list, tuple)) and all(isinstance(r, dict) for r in value):
        return list(value)
    raise ValueError(f"{setting}: rows must be a list of dicts or a dict of columns; got {type(value).__name__}")


def load_rows(source: str, setting: str = "hf.dataset") -> tuple[list[dict], list[dict] | None]:
    """``(train rows, test rows or None)`` from a data file or a ``module:function``."""
    path = Path(source).expanduser()
    if not path.exists() and _FUNCTION.fullmatch(source):
        module, _, name = source.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"{setting} = {source!r}: cannot import it: {exc}") from None
        splits = fn()
        if not isinstance(splits, dict) or "train" not in splits or set(splits) - {"train", "test"}:
            raise ValueError(f"{setting} = {source!r} must return {{'train': rows, 'test': rows (optional)}}")
        test = splits.get("test")
        return _rows(splits["train"], setting), None if test is None else _rows(test, setting)
    if not path.is_file():
        raise ValueError(f"{setting} = {source!r}: no such file")
    return _read_file(path, setting), None


def _column(rows: list[dict], column: str, setting: str, source: str, kind=str) -> list:
    if not rows:
        raise ValueError(f"hf.dataset = {source!r} has no rows")
    if column not in rows[0]:
        raise ValueError(f"{setting} = {column!r} is not a column of {source} (columns: {sorted(rows[0])})")
    values = [r.get(column) for r in rows]
    bad = next((i for i, v in enumerate(values) if not isinstance(v, kind) or isinstance(v, bool)), None)
    if bad is not None:
        raise ValueError(f"{setting} = {column!r}: row {bad + 1} of {source} holds {values[bad]!r:.40}, "
                         f"not {'text' if kind is str else 'a label'}")
    return values


# ----------------------------------------------------------------------------- the tasks


class _HFTask(PeftTask):
    """What both hf tasks share: data, splits, the model with LoRA, the device."""

    auto_class = "AutoModelForSequenceClassification"

    def __init__(self, cfg: RunConfig):
        s = {**HF_DEFAULTS, **cfg.hf}
        self.settings, self.config = s, cfg
        train, test = load_rows(s["dataset"])
        if s["test_dataset"] is not None:
            if test is not None:
                raise ValueError(f"hf.test_dataset = {s['test_dataset']!r}: hf.dataset = {s['dataset']!r} "
                                 "already returns a test split")
            test, _ = load_rows(s["test_dataset"], "hf.test_dataset")
        n_train = len(train)
        rows = train + (test or [])
        if len(rows) < 2:
            raise ValueError(f"hf.dataset = {s['dataset']!r} has {len(rows)} rows; at least 2 are needed")
        self._read_columns(rows, s)
        if test is None:
            train_idx, test_idx = fd.train_test_split(n_train, cfg.test_fraction, cfg.seed)
        else:
            train_idx, test_idx = np.arange(n_train), np.arange(n_train, len(rows))
        self.client_indices = self._split(train_idx, cfg, s)
        self.client_sizes = np.array([len(p) for p in self.client_indices], dtype=float)
        self.test_indices = test_idx[: cfg.test_size] if cfg.test_size else test_idx
        self.device = resolve_device(cfg.device)
        model, self.tokenizer = self._load(cfg, s)
        self._tokenize(cfg.max_length)
        self.adopt(model, self.device)
        self.flops_per_sample = 6.0 * sum(p.numel() for p in model.parameters()) * cfg.max_length

    # -- data -------------------------------------------------------------------------------------
    def _read_columns(self, rows, s):
        self.texts = _column(rows, s["text_column"], "hf.text_column", s["dataset"])
        self.groups = None
        if s["split_column"] is not None:
            values = _column(rows, s["split_column"], "hf.split_column", s["dataset"], (str, int))
            self.groups = np.unique(np.array([str(v) for v in values]), return_inverse=True)[1].reshape(-1)

    def _split(self, train_idx, cfg, s) -> list[np.ndarray]:
        how = s["client_split"] or self.default_split
        if len(train_idx) < cfg.clients:
            raise ValueError(f"clients = {cfg.clients} exceeds the {len(train_idx)} training examples of "
                             f"hf.dataset = {s['dataset']!r}")
        if how == "column":
            return fd.split_by_movie(self.groups, cfg.clients, cfg.seed, indices=train_idx)
        if how == "dirichlet":
            if getattr(self, "labels", None) is None:
                raise ValueError(f"hf.client_split = 'dirichlet' splits over labels, which {self.name} has none "
                                 "of; use 'iid' or 'column'")
            return fd.split_dirichlet(self.labels.numpy(), cfg.clients, cfg.dirichlet_alpha, cfg.seed,
                                      indices=train_idx)
        perm = np.random.default_rng(cfg.seed).permutation(train_idx)
        return [np.sort(p) for p in np.array_split(perm, cfg.clients)]

    # -- model ------------------------------------------------------------------------------------
    def _load(self, cfg, s):
        _, transformers, peft = fd.import_hf()
        path = Path(s["model"]).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(f"hf.model = {s['model']!r}: no such model directory (with a config.json)")
        tok_path = Path(s["tokenizer"]).expanduser() if s["tokenizer"] is not None else path
        if s["tokenizer"] is not None and not tok_path.is_dir():
            raise ValueError(f"hf.tokenizer = {s['tokenizer']!r}: no such directory")
        dtype = getattr(torch, cfg.dtype)
        if dtype == torch.bfloat16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"dtype = 'bfloat16' is not supported by {torch.cuda.get_device_name(self.device)}")
        with fd.quiet_transformers(transformers), torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_path), local_files_only=True)
            except (OSError, ValueError, TypeError) as exc:
                raise ValueError(f"hf.tokenizer = {str(tok_path)!r}: cannot load a tokenizer: {exc}") from None
            if tokenizer.pad_token is None:
                if tokenizer.eos_token is None:
                    raise ValueError(f"hf.tokenizer = {str(tok_path)!r} has neither a pad nor an eos token")
                tokenizer.pad_token = tokenizer.eos_token
            auto = getattr(transformers, self.auto_class)
            try:
                model = auto.from_pretrained(str(path), local_files_only=True, use_safetensors=True, dtype=dtype,
                                             **self._model_kwargs())
            except (OSError, ValueError, KeyError, TypeError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ValueError(f"hf.model = {s['model']!r}: cannot load it as {self.auto_class}: {first}") from None
            if getattr(model.config, "pad_token_id", None) is None:
                model.config.pad_token_id = tokenizer.pad_token_id
            vocab = model.get_input_embeddings().weight.shape[0]
            if len(tokenizer) > vocab:
                raise ValueError(f"hf.tokenizer: its {len(tokenizer)} tokens exceed the model's {vocab} embeddings")
            targets, head = _names(s["target_modules"]), _names(s["head"])
            if targets == []:
                raise ValueError(f"hf.target_modules = {s['target_modules']!r} names no module")
            head = self._default_head(model) if head is None else head
            if not cfg.train_head:
                head = []
            self._check_modules(model, targets, head)
            lora = peft.LoraConfig(r=cfg.structural_rank, lora_alpha=float(cfg.alpha or cfg.structural_rank),
                                   target_modules=targets, modules_to_save=head or None, lora_dropout=0.0,
                                   bias="none")
            try:
                warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")  # GPT-2's Conv1D
                model = peft.get_peft_model(model, lora)
            except ValueError as exc:
                raise ValueError(f"hf.target_modules = {targets!r}: {' '.join(str(exc).split())[:300]}") from None
        model.to(self.device).eval()
        return model, tokenizer

    def _model_kwargs(self) -> dict:
        return {}

    def _default_head(self, model) -> list[str]:
        return []

    @staticmethod
    def _check_modules(model, targets, head) -> None:
        modules = dict(model.named_modules())
        for t in targets or ():
            found = [m for n, m in modules.items() if n == t or n.endswith("." + t)]
            if not found:
                linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if type(m).__name__ in _LAYERS})
                raise ValueError(f"hf.target_modules: the model has no module {t!r} (its linear layers: {linear})")
            odd = next((m for m in found if type(m).__name__ not in _LAYERS), None)
            if odd is not None:
                raise ValueError(f"hf.target_modules: {t!r} is a {type(odd).__name__}; LoRA here adapts linear "
                                 "layers (Linear, Conv1D)")
        for h in head:
            if not any(n == h or n.endswith("." + h) for n in modules):
                raise ValueError(f"hf.head: the model has no module {h!r}")

    def _inputs(self, idx):
        idx = torch.as_tensor(np.asarray(idx))
        return self.input_ids[idx].to(self.device), self.attention_mask[idx].to(self.device)


class HFClassificationTask(_HFTask):
    """Sequence classification with any local AutoModelForSequenceClassification model."""

    name = "hf-classification"
    default_split = "dirichlet"

    def _read_columns(self, rows, s):
        super()._read_columns(rows, s)
        raw = _column(rows, s["label_column"], "hf.label_column", s["dataset"], (str, int))
        if len({type(v) for v in raw}) > 1:
            raise ValueError(f"hf.label_column = {s['label_column']!r} mixes text and integer labels")
        self.classes, codes = np.unique(np.array(raw), return_inverse=True)
        if len(self.classes) < 2:
            raise ValueError(f"hf.label_column = {s['label_column']!r} holds one class; at least 2 are needed")
        self.labels = torch.as_tensor(codes.reshape(-1).astype(np.int64))

    def _model_kwargs(self):
        return {"num_labels": len(self.classes), "ignore_mismatched_sizes": True}

    def _default_head(self, model):
        return [n for n in ("classifier", "score") if isinstance(getattr(model, n, None), torch.nn.Module)]

    def _tokenize(self, max_length):
        enc = fd.tokenize(self.tokenizer, self.texts, max_length)
        self.input_ids, self.attention_mask = enc["input_ids"], enc["attention_mask"]

    def batch(self, idx):
        return *self._inputs(idx), self.labels[torch.as_tensor(np.asarray(idx))].to(self.device)

    def loss(self, batch):
        ids, mask, y = batch
        return torch.nn.functional.cross_entropy(self.model(input_ids=ids, attention_mask=mask).logits.float(), y)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        self.model.eval()
        total, correct, n = 0.0, 0, 0
        for i in range(0, len(self.test_indices), 64):
            ids, mask, y = self.batch(self.test_indices[i:i + 64])
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            n += len(y)
        return total / n, correct / n


class HFCausalLMTask(_HFTask):
    """Next-token fine-tuning of any local AutoModelForCausalLM model; perplexity as the metric."""

    name = "hf-causal-lm"
    auto_class = "AutoModelForCausalLM"
    default_split = "iid"

    def _read_columns(self, rows, s):
        super()._read_columns(rows, s)
        self.prompts = None if s["prompt_column"] is None else \
            _column(rows, s["prompt_column"], "hf.prompt_column", s["dataset"])

    def _tokenize(self, max_length):
        """input_ids and attention_mask as tokenised, and targets: the ids of the text's real
        tokens, -100 on padding and on the prompt (tokenised as the first of a pair)."""
        if self.prompts is None:
            enc = fd.tokenize(self.tokenizer, self.texts, max_length)
            targets = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        else:
            if not getattr(self.tokenizer, "is_fast", False):
                raise ValueError("hf.prompt_column needs a fast tokenizer (to tell prompt tokens from text tokens)")
            enc = self.tokenizer(list(self.prompts), list(self.texts), padding="max_length",
                                 truncation="longest_first", max_length=max_length, return_tensors="pt")
            text = torch.tensor([[s == 1 for s in enc.sequence_ids(i)] for i in range(len(self.texts))])
            targets = enc["input_ids"].masked_fill(~text | (enc["attention_mask"] == 0), -100)
        self.input_ids, self.attention_mask, self.targets = enc["input_ids"], enc["attention_mask"], targets

    def batch(self, idx):
        return *self._inputs(idx), self.targets[torch.as_tensor(np.asarray(idx))].to(self.device)

    def _token_losses(self, batch):
        """Summed next-token cross-entropy of the batch and the number of scored tokens."""
        ids, mask, targets = batch
        logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        nxt = torch.nn.functional.pad(targets[:, 1:], (0, 1), value=-100)  # position j predicts token j + 1
        nll = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), nxt.reshape(-1),
                                                ignore_index=-100, reduction="sum")
        return nll, int((nxt != -100).sum())

    def loss(self, batch):
        nll, tokens = self._token_losses(batch)
        return nll / max(tokens, 1)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        self.model.eval()
        total, tokens = 0.0, 0
        for i in range(0, len(self.test_indices), 64):
            nll, n = self._token_losses(self.batch(self.test_indices[i:i + 64]))
            total, tokens = total + float(nll), tokens + n
        return (total / tokens if tokens else math.nan), math.nan

    def ledger_metrics(self, test_loss: float, accuracy: float) -> dict:
        return {"perplexity": math.exp(min(test_loss, 700.0)) if math.isfinite(test_loss) else math.nan}


def make_hf_task(cfg: RunConfig) -> _HFTask:
    return (HFClassificationTask if cfg.task == "hf-classification" else HFCausalLMTask)(cfg)
