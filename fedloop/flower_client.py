"""The ClientApp of TSFA + SOFT on Flower: what a node does in each phase of a round.

The protocol is :mod:`fedloop.flower`'s (the strategy and ServerApp live there). A node (its
partition k from its ``partition-id`` node config) builds its task once, and per round:

* ``train`` (:func:`client_train`): reads the adapter it trains from (the global factors, or
  under a compressed downlink its view updated by the round's broadcast, :func:`_received`),
  the deltas folded into the frozen weights (``svd``, ``ideal``), re-expresses its
  error-feedback residual in the round's basis (:func:`_residual_now`), trains exactly as
  ``fedloop`` does (:func:`fedloop.client.train_client`), keeps the factors in its
  ``Context.state`` and replies with its error profile;
* ``train.upload`` (:func:`client_upload`): encodes the strategy's upload with the keep count
  the server allocated to it (:mod:`fedloop.flower_codec`) and keeps what the payload does not
  carry as its residual.

Everything read from a message or from the node's state is validated (names, shapes, dtypes,
finite values) before use. The node's state (``Context.state``): :data:`STATE_KEY` (this
round's factors between the two phases), :data:`RESIDUAL_KEY` (the error-feedback residual
and the round of its basis), :data:`VIEW_KEY` (the view under a compressed downlink).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

try:
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("fedloop.flower_client needs Flower >= 1.42: pip install 'tsfa[flower]'") from exc

import soft
from fedloop.client import RunFailed, applied, to_host, train_client
from fedloop.config import RunConfig
from fedloop.flower_codec import encode as encode_upload
from fedloop.flower_codec import pack_tensors, unpack_tensors
from fedloop.server import apply_broadcast
from fedloop.strategies import get as get_strategy
from fedloop.tasks import make_task
from soft.feedback import residual, rotate, with_inverse, with_residual

__all__ = ["client_app", "client_train", "client_upload", "pack_adapter", "unpack_adapter", "adapter_spec",
           "folded_shapes", "FOLDING", "STATE_KEY", "RESIDUAL_KEY", "VIEW_KEY"]

#: A node's ``Context.state`` entries: the round's factors between the phases, the error-feedback
#: residual, the view of the adapter under a compressed downlink.
STATE_KEY = "fedloop.state"
RESIDUAL_KEY = "fedloop.residual"
VIEW_KEY = "fedloop.view"


# -- arrays ----------------------------------------------------------------------------------
def pack_adapter(factors: Mapping | None = None, head: Mapping | None = None, prefix: str = "") -> dict:
    """``{prefix}lora/<module>/A|B`` and ``{prefix}head/<name>`` CPU tensors of ``factors`` and
    ``head``: what a message's or a node state's safetensors blob holds."""
    out = {}
    for name, (A, B) in (factors or {}).items():
        out[f"{prefix}lora/{name}/A"] = A.detach().cpu()
        out[f"{prefix}lora/{name}/B"] = B.detach().cpu()
    for name, p in (head or {}).items():
        out[f"{prefix}head/{name}"] = p.detach().cpu()
    return out


def unpack_adapter(tensors: Mapping[str, torch.Tensor], prefix: str = "") -> tuple[dict, dict]:
    """(factors ``{module: (A, B)}``, head ``{name: tensor}``) from :func:`pack_adapter`'s names
    under ``prefix`` (validate with :func:`adapter_spec` first)."""
    factors: dict[str, list] = {}
    head = {}
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        kind, _, rest = key[len(prefix):].partition("/")
        if kind == "lora":
            name, _, which = rest.rpartition("/")
            factors.setdefault(name, [None, None])[0 if which == "A" else 1] = value
        elif kind == "head":
            head[rest] = value
    return {n: (a, b) for n, (a, b) in factors.items()}, head


def adapter_spec(factors: Mapping, head: Mapping) -> dict:
    """name -> (shape, (float32,)) of the packed tensors of ``factors`` and ``head``."""
    return {k: (tuple(v.shape), (torch.float32,)) for k, v in pack_adapter(factors, head).items()}


def _global_from_bytes(data, task, factors: bool = True) -> dict:
    """The global factors (unless ``factors`` is False: the head alone) and head a node received,
    checked against its own task's tensors."""
    return unpack_tensors(data, adapter_spec(to_host(task.factors()) if factors else {}, to_host(task.head())),
                          "the global adapter")


def _received(context: Context, cfg: RunConfig, conf, t: int, task) -> tuple[dict, dict]:
    """The adapter (factors, head) this node trains from in round t. Under a compressed downlink
    (``flasc``, ``downlink_value_bits``) the node holds its view of the adapter in its
    ``Context.state`` (``fedloop.view``, with its round) and the message carries either the view
    whole (``global``) or the round's broadcast (``delta``, with the head alone in ``global``),
    which it applies as the server did (:func:`fedloop.server.apply_broadcast`). A view of
    another round than the broadcast's is a ValueError (the server sends the whole view next)."""
    if "delta" not in conf:
        factors, head = unpack_adapter(_global_from_bytes(conf["global"], task))
    else:
        _, head = unpack_adapter(_global_from_bytes(conf["global"], task, factors=False))
        state = context.state.get(VIEW_KEY)
        if state is None or int(state["round-index"]) != t - 1:
            held = "none" if state is None else f"round {int(state['round-index']) + 1}'s"
            raise ValueError(f"the broadcast updates round {t}'s view of the adapter; this node holds {held}")
        spec = adapter_spec(to_host(task.factors()), {})
        view, _ = unpack_adapter(unpack_tensors(state["tensors"], spec, "this node's view"))
        factors = apply_broadcast(get_strategy(cfg.strategy), view, bytes(conf["delta"]), task.lora_shape())
    if cfg.compressed_downlink:
        context.state[VIEW_KEY] = ConfigRecord({"round-index": t, "tensors": pack_tensors(pack_adapter(factors))})
    return factors, head


#: Strategies whose server folds updates into the frozen weights (the nodes must receive them).
FOLDING = ("svd", "ideal")


def folded_shapes(factors: Mapping) -> dict:
    """name -> ((m, n), (float32,)): the frozen weight delta of each module (m × n = B A)."""
    return {f"folded/{n}": ((tuple(B.shape)[0], tuple(A.shape)[1]), (torch.float32,)) for n, (A, B) in factors.items()}


def _sync_folded(task, data) -> None:
    """Make the node's frozen weights the task's own plus the server's folded deltas ``data``
    (safetensors ``folded/<module>``, or empty for none): the node remembers what it folded and
    folds the difference, so a node that missed rounds, or a task reused by a new run, catches up."""
    factors = to_host(task.factors())
    target = {k.split("/", 1)[1]: v for k, v in
              (unpack_tensors(data, folded_shapes(factors), "the folded weights") if data else {}).items()}
    done = task.__dict__.setdefault("_flower_folded", {})
    for name in factors:
        want, have = target.get(name), done.get(name)
        if want is None and have is None:
            continue
        delta = (want if want is not None else torch.zeros_like(have)) - (have if have is not None else 0)
        if bool(delta.any()):
            task.fold(name, delta)
        if want is None:
            del done[name]
        else:
            done[name] = want


# -- client ------------------------------------------------------------------------------------
_TASKS: dict[str, Any] = {}


def _task_for(cfg: RunConfig):
    """The node's task (model and data), built once per process and configuration."""
    key = json.dumps({k: v for k, v in cfg.to_dict().items()
                      if k not in ("rounds", "out", "checkpoint_every", "eval_every", "predict_every", "strategy",
                                   "keep", "relative_v", "budget_factor", "latency_budget_s", "cap_factor",
                                   "allow_skip", "deadline_factor", "reject_norm_factor", "bandwidth_hz", "value_bits",
                                   "error_feedback", "downlink_value_bits", "downlink_keep")},
                     sort_keys=True) + f"/rank {cfg.structural_rank}"
    if key not in _TASKS:
        _TASKS.clear()
        _TASKS[key] = make_task(cfg)
    return _TASKS[key]


def _partition(context: Context, cfg: RunConfig) -> int:
    nc = context.node_config
    if "partition-id" not in nc:
        raise ValueError("the node has no partition-id: start it with --node-config 'partition-id=K "
                         "num-partitions=N'")
    k = int(nc["partition-id"])
    n = int(nc.get("num-partitions", cfg.clients))
    if n != cfg.clients or not 0 <= k < cfg.clients:
        raise ValueError(f"node config partition-id={k} num-partitions={n} does not fit the run's "
                         f"clients = {cfg.clients}")
    return k


client_app = ClientApp()


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    """Phase 1: local training from the global factors; reply with the error profile."""
    conf = msg.content["config"]
    cfg = RunConfig.from_dict(json.loads(conf["run-config"]))
    t = int(conf["round-index"])
    k = _partition(context, cfg)
    task = _task_for(cfg)
    global_factors, global_head = _received(context, cfg, conf, t, task)
    _sync_folded(task, conf["folded"] if "folded" in conf else b"")
    feedback = cfg.error_feedback != "none"
    res, lost = _residual_now(context, cfg, conf, t, global_factors) if feedback else (None, "")
    try:
        local, head, loss = train_client(cfg, task, global_factors, global_head, t, k)
    except RunFailed as exc:  # a non-finite loss stops the run, as in fedloop
        return Message(RecordDict({"fatal": ConfigRecord({"reason": str(exc)}),
                                   "metrics": MetricRecord({"partition-id": k})}), reply_to=msg)
    if feedback:  # send from local + what was not sent before; until it sends, all of it is pending
        local = with_residual(local, res)
        _keep_residual(context, t, residual(local, global_factors))
    profile = soft.error_profile(global_factors, local, scope=cfg.scope)
    # kept in the node's Context.state until phase 2 (the SuperNode keeps it per run, across processes)
    context.state[STATE_KEY] = ConfigRecord({
        "round-index": t, "partition-id": k, "run-config": conf["run-config"],
        "tensors": pack_tensors(pack_adapter(global_factors, None, "old/") | pack_adapter(local, head, "new/"))})
    reply = RecordDict({"metrics": MetricRecord({
        "partition-id": k, "train-loss": float(loss), "num-examples": int(task.client_sizes[k]),
        "profile": [float(x) for x in np.asarray(profile, dtype=np.float64)]})})
    if lost:
        reply["residual"] = ConfigRecord({"lost": lost})
    return Message(reply, reply_to=msg)


def _residual_now(context: Context, cfg: RunConfig, conf, t: int, glob: dict) -> tuple[dict | None, str]:
    """This node's error-feedback residual in the coordinates of round t's global factors, and
    why it was dropped ("" if it was not). The residual lives in ``Context.state`` with the
    round whose factors it is expressed in; rotated feedback applies the server's changes of
    basis for the rounds since (``basis-rounds``, ``basis``: M per module, float64; the node
    computes M⁻¹ as the server does). Both are validated (shapes, dtypes, finite) before use.
    The rotated residual is stored at once, so a failure later in the round keeps it."""
    state = context.state.get(RESIDUAL_KEY)
    if state is None:
        return None, ""
    a = int(state["round-index"])
    del context.state[RESIDUAL_KEY]
    shapes = {f"{n}/{w}": (tuple(x.shape), (torch.float32,)) for n, pair in glob.items()
              for w, x in zip("AB", pair, strict=True)}
    stored = unpack_tensors(state["tensors"], shapes, "this node's residual")
    res = {n: (stored[f"{n}/A"], stored[f"{n}/B"]) for n in glob}
    if cfg.error_feedback == "rotated" and cfg.resolved_reorthogonalize and a != t:
        rounds = [int(b) for b in conf["basis-rounds"]] if "basis-rounds" in conf else []
        if a > t or not set(range(a, t)) <= set(rounds):
            return None, f"the residual of round {a + 1} cannot be re-expressed in round {t + 1}'s basis"
        mats = unpack_tensors(conf["basis"], {f"{b}/{n}": ((A.shape[0],) * 2, (torch.float64,)) for b in rounds
                                              for n, (A, _) in glob.items()}, "the server's changes of basis")
        for b in range(a, t):
            res = rotate(res, with_inverse({n: mats[f"{b}/{n}"] for n in glob}))
    _keep_residual(context, t, res)
    return res, ""


def _keep_residual(context: Context, t: int, res: dict) -> None:
    """Store this node's residual, expressed in round t's global factors, in its Context.state."""
    context.state[RESIDUAL_KEY] = ConfigRecord({"round-index": t, "tensors": pack_tensors(
        {f"{n}/{w}": x for n, pair in res.items() for w, x in zip("AB", pair, strict=True)})})


@client_app.train("upload")
def client_upload(msg: Message, context: Context) -> Message:
    """Phase 2: encode the strategy's upload with the keep count the server allocated to this node."""
    conf = msg.content["config"]
    t, keep = int(conf["round-index"]), int(conf["keep"])
    state = context.state.get(STATE_KEY)
    if state is None or int(state["round-index"]) != t:
        raise RuntimeError(f"no locally trained update for round {t + 1} on this node (restarted?)")
    cfg = RunConfig.from_dict(json.loads(state["run-config"]))
    k = int(state["partition-id"])
    task = _task_for(cfg)
    glob, head = to_host(task.factors()), to_host(task.head())
    expected = {f"old/{k}": v for k, v in adapter_spec(glob, {}).items()} | \
        {f"new/{k}": v for k, v in adapter_spec(glob, head).items()}
    # this node's own state (Context.state), safetensors, read back in the task's module order
    tensors = unpack_tensors(state["tensors"], expected, "this node's state")
    global_factors, _ = unpack_adapter(tensors, "old/")
    local, head = unpack_adapter(tensors, "new/")
    parts = encode_upload(cfg, global_factors, local, keep, t, k)  # bytes only (fedloop.flower_codec)
    del context.state[STATE_KEY]
    if cfg.error_feedback != "none":  # keep what this payload does not carry, as the server will read it
        reader = SimpleNamespace(strategy=get_strategy(cfg.strategy), client_factors=global_factors,
                                 soft_shape=task.lora_shape())
        _keep_residual(context, t, residual(local, applied(reader, parts["payload"], keep)))
    reply = RecordDict({
        "upload": ConfigRecord({**parts, "head": pack_tensors(pack_adapter(None, head))}),
        "metrics": MetricRecord({"partition-id": k, "uplink-bits": 8 * sum(len(b) for b in parts.values()),
                                 "keep": keep, "bandwidth-hz": float(conf["bandwidth-hz"])}),
    })
    return Message(reply, reply_to=msg)
