"""TSFA + SOFT on Flower (>= 1.42, the Message API): a strategy, a ServerApp and a ClientApp.

Install the extra: ``pip install 'tsfa[flower]'``. ``fedloop`` itself never imports ``flwr``;
this module does, on import.

Protocol (two Flower message exchanges per FL round, both inside one Flower round):

1. ``configure_train`` sends every connected node a ``train`` message: the global LoRA factors
   and head (``ArrayRecord``) and the run's :class:`~fedloop.RunConfig` as JSON plus the
   round index (``ConfigRecord``). The node (partition ``k`` = its ``partition-id`` node
   config) trains exactly as ``fedloop`` does (:func:`fedloop.client.train_client`, seeded from
   (seed, round, k)), keeps the received and trained factors in its ``Context.state``, and
   replies with its error profile e_k(s), s = 0..r, and its partition id.
2. ``aggregate_train`` draws the round's channel for partitions 0..K−1 **on the server**
   (``fedloop``'s cell: fixed positions from the seed, Rayleigh fading per round; the nodes
   report no channel state), runs the strategy's policy (``tsfa``: the ``OnlineAllocator``),
   then sends each scheduled node a ``train.upload`` message with **its own** keep count and
   bandwidth in its own ``ConfigRecord``. The node replies with its SOFT payload bytes
   (``ConfigRecord["payload"]``, :func:`fedloop.strategies.encode_update`) and its head. The server
   decodes, aggregates rank-wise with the data weights, re-orthogonalises, feeds the round's
   latency to the Lyapunov queue, evaluates and writes the ledger — the server half of
   ``fedloop``'s round (:meth:`fedloop.Server.step`, with this strategy as its client pool).

Both phases run in ``aggregate_train`` (the second one through the ``Grid`` that
``configure_train`` received), so Flower's ``Strategy.start`` loop, ``Result`` and logging
are used unchanged. Faults, each recorded in the ledger (client status ``error: ...``, no bits):

* a node whose ClientApp raises (an error reply) is dropped from that round only, as a failing
  client is in ``fedloop`` — before its profile (phase 1) or after its allocation (phase 2:
  its bandwidth is then wasted for the round, as on a real uplink);
* a node that does not answer within ``round-timeout`` seconds (killed, disconnected), or that
  the SuperLink reports unavailable, is dropped from that round and not contacted again in
  this run (a restarted SuperNode registers under a new node id and joins the next round);
  its partition reads ``error: node lost`` afterwards, and one that never had a node
  ``error: no node``.

Run config keys (``[tool.flwr.app.config]`` of a Flower app, or ``flwr run -c``, which only
overrides keys the app lists): every :class:`~fedloop.RunConfig` field, spelled with ``-`` or
``_`` (``local-steps``); ``linear.*``, ``distill.*`` and ``hf.*`` for the tasks' tables
(``hf.target-modules`` and ``hf.head`` as one comma-separated string, ``""`` for no head);
``"none"`` for a ``None`` value; and the Flower settings ``round-timeout`` (s, default 300),
``min-nodes`` (nodes to wait for before the first round; 0 or absent = ``clients``),
``wait-timeout`` (s to wait for them, default 600) and ``resume`` (continue from the
checkpoint in ``out``, :mod:`fedloop.checkpoint`). ``out`` should be an absolute path in a
deployment (the ServerApp runs in its own process and working directory). An hf task's paths
must exist on the SuperLink's machine and on every SuperNode's; each builds the task with its
own ``device``.

Supported strategies: :data:`fedloop.strategies.REMOTE_STRATEGIES` (tsfa, fixed, random, fedit).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.common import log
    from flwr.common.constant import ErrorCode
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("fedloop.flower needs Flower >= 1.42: pip install 'tsfa[flower]'") from exc

import soft
from fedloop.checkpoint import RunFolder, check_run_folder, load_checkpoint
from fedloop.client import RunFailed, TrainReport, Upload, train_client
from fedloop.config import RunConfig
from fedloop.server import Server
from fedloop.strategies import REMOTE_STRATEGIES, encode_update
from fedloop.tasks import make_task

__all__ = ["FlowerSettings", "TsfaStrategy", "client_app", "client_train", "client_upload", "server_app",
           "make_server_app", "config_from_run_config", "run_flower"]

UPLOAD = f"{MessageType.TRAIN}.upload"
_STATE_ARRAYS, _STATE_META = "fedloop.arrays", "fedloop.meta"


@dataclass
class FlowerSettings:
    """Flower-side settings of a run (not part of the :class:`RunConfig`)."""

    round_timeout: float = 300.0
    min_nodes: int | None = None
    wait_timeout: float = 600.0
    resume: bool = False


# -- run config --------------------------------------------------------------------------------
_FLOWER_KEYS = {"round-timeout": "round_timeout", "min-nodes": "min_nodes", "wait-timeout": "wait_timeout",
                "resume": "resume"}


def config_from_run_config(run_config: Mapping[str, Any]) -> tuple[RunConfig, FlowerSettings]:
    """A :class:`RunConfig` and :class:`FlowerSettings` from a Flower run config (flat keys)."""
    data: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {"linear": {}, "distill": {}, "hf": {}}
    for key, value in run_config.items():
        if isinstance(value, str) and value.strip().lower() in ("none", "null"):
            value = None
        table = key.split(".", 1)[0]
        if key in _FLOWER_KEYS:
            settings[_FLOWER_KEYS[key]] = value
        elif "." in key and table in tables:
            tables[table][key.split(".", 1)[1].replace("-", "_")] = value
        else:
            data[key.replace("-", "_")] = value
    data.update({name: values for name, values in tables.items() if values})
    if "error_feedback" in data and data["error_feedback"] is None:  # its off value is the string "none"
        data["error_feedback"] = "none"
    for name in ("lr", "head_lr", "bandwidth_hz", "budget_factor", "relative_v", "dirichlet_alpha", "test_fraction",
                 "reject_norm_factor"):
        if isinstance(data.get(name), int) and not isinstance(data[name], bool):
            data[name] = float(data[name])  # TOML `lr = 1` is an int
    return RunConfig.from_dict(data), FlowerSettings(**settings)


def _config_json(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


# -- arrays ----------------------------------------------------------------------------------
def _pack(factors: Mapping | None = None, head: Mapping | None = None, prefix: str = "") -> dict:
    out = {}
    for name, (A, B) in (factors or {}).items():
        out[f"{prefix}lora/{name}/A"] = A.detach().cpu()
        out[f"{prefix}lora/{name}/B"] = B.detach().cpu()
    for name, p in (head or {}).items():
        out[f"{prefix}head/{name}"] = p.detach().cpu()
    return out


def _unpack(tensors: Mapping[str, torch.Tensor], prefix: str = "") -> tuple[dict, dict]:
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


def _to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict=dict(tensors)) if tensors else ArrayRecord()


def _from_record(record: ArrayRecord) -> dict:
    return dict(record.to_torch_state_dict()) if len(record) else {}


# -- client ------------------------------------------------------------------------------------
_TASKS: dict[str, Any] = {}


def _task_for(cfg: RunConfig):
    """The node's task (model and data), built once per process and configuration."""
    key = json.dumps({k: v for k, v in cfg.to_dict().items()
                      if k not in ("rounds", "out", "checkpoint_every", "eval_every", "predict_every", "strategy",
                                   "keep", "relative_v", "budget_factor", "latency_budget_s", "cap_factor",
                                   "allow_skip", "deadline_factor", "reject_norm_factor", "bandwidth_hz", "value_bits",
                                   "error_feedback")},
                     sort_keys=True)
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
    global_factors, global_head = _unpack(_from_record(msg.content["arrays"]))
    task = _task_for(cfg)
    try:
        local, head, loss = train_client(cfg, task, global_factors, global_head, t, k)
    except RunFailed as exc:  # a non-finite loss stops the run, as in fedloop
        return Message(RecordDict({"fatal": ConfigRecord({"reason": str(exc)}),
                                   "metrics": MetricRecord({"partition-id": k})}), reply_to=msg)
    profile = soft.error_profile(global_factors, local, scope=cfg.scope)
    context.state[_STATE_ARRAYS] = _to_record(_pack(global_factors, None, "old/") | _pack(local, head, "new/"))
    context.state[_STATE_META] = ConfigRecord({"round-index": t, "partition-id": k, "run-config": conf["run-config"]})
    reply = RecordDict({
        "profile": ArrayRecord(numpy_ndarrays=[np.asarray(profile, dtype=np.float64)]),
        "metrics": MetricRecord({"partition-id": k, "train-loss": float(loss),
                                 "num-examples": int(task.client_sizes[k])}),
    })
    return Message(reply, reply_to=msg)


@client_app.train("upload")
def client_upload(msg: Message, context: Context) -> Message:
    """Phase 2: encode the SOFT payload with the keep count the server allocated to this node."""
    conf = msg.content["config"]
    t, keep = int(conf["round-index"]), int(conf["keep"])
    meta = context.state.get(_STATE_META)
    if meta is None or int(meta["round-index"]) != t:
        raise RuntimeError(f"no locally trained update for round {t + 1} on this node (restarted?)")
    cfg = RunConfig.from_dict(json.loads(meta["run-config"]))
    k = int(meta["partition-id"])
    tensors = _from_record(context.state[_STATE_ARRAYS])
    global_factors, _ = _unpack(tensors, "old/")
    local, head = _unpack(tensors, "new/")
    data = encode_update(cfg, global_factors, local, keep, t, k)
    del context.state[_STATE_ARRAYS]
    del context.state[_STATE_META]
    reply = RecordDict({
        "upload": ConfigRecord({"payload": data}),
        "head": _to_record(_pack(None, head)),
        "metrics": MetricRecord({"partition-id": k, "uplink-bits": 8 * len(data), "keep": keep,
                                 "bandwidth-hz": float(conf["bandwidth-hz"])}),
    })
    return Message(reply, reply_to=msg)


# -- server ------------------------------------------------------------------------------------
#: Flower error codes that mean the node is gone, not that its ClientApp failed.
_GONE = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE)


def _reason(msg: Message) -> str:
    """A one-line reason: Ray and the SuperNode wrap the ClientApp's exception in a traceback."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(msg.error.reason))
    if "Message:" in text:
        text = text.rsplit("Message:", 1)[1]
    lines = [ln.strip() for ln in text.strip().strip("'>").splitlines() if ln.strip()]
    return f"flower error {msg.error.code}: {lines[-1] if lines else '?'}"[:180]


class TsfaStrategy(FedAvg):
    """FedAvg subclass running TSFA's allocation and SOFT's rank-wise aggregation (module docstring).

    Args:
        config: the run (task, strategy in :data:`~fedloop.strategies.REMOTE_STRATEGIES`, K = ``clients``
            partitions, wireless settings, ``out`` folder for checkpoints and the ledger).
        settings: :class:`FlowerSettings` (round timeout, nodes to wait for, resume).

    The server state is a :class:`fedloop.Server` (``self.server``): global factors and head, the
    policy (with the Lyapunov queue), the round counter and the ledger (``self.history``). The
    strategy itself is the server's client pool (``train`` and ``upload``). The state is
    checkpointed to ``config.out`` (:mod:`fedloop.checkpoint`) every ``checkpoint_every`` rounds and at the
    end, with ``history.json``; ``settings.resume`` continues from there.
    """

    def __init__(self, config: RunConfig, settings: FlowerSettings | None = None, callbacks=()):
        if config.strategy not in REMOTE_STRATEGIES:
            raise ValueError(f"strategy {config.strategy!r} is not supported on Flower; use one of "
                             f"{REMOTE_STRATEGIES}")
        if config.error_feedback != "none":
            raise ValueError(f"error_feedback = {config.error_feedback!r} runs in process only (the residuals live "
                             "with the in-process clients); use error_feedback = 'none' on Flower")
        self.settings = settings or FlowerSettings()
        min_nodes = self.settings.min_nodes or config.clients
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1,
                         min_available_nodes=int(min_nodes))
        self.config = config
        self.callbacks = list(callbacks)  # callback(row) per round, as in fedloop.run
        self.server = Server(config)
        self.server.history.meta["engine"] = "flower"
        if self.settings.resume:
            self.server.load_checkpoint(check_run_folder(config.out))
        self._grid: Grid | None = None
        self._phase1_nodes: list[int] = []
        self._lost: set[int] = set()  # nodes that stopped answering: not contacted again
        self._part: dict[int, int] = {}  # node id -> partition, from the nodes' replies
        self._node_of: dict[int, int] = {}  # partition -> node id, this round
        self._replies: list[Message] = []  # phase 1's replies, this round
        self._waited = False
        self.notes: list[str] = []

    @property
    def history(self):
        return self.server.history

    @property
    def remaining_rounds(self) -> int:
        return max(self.config.rounds - self.server.round, 0)

    def summary(self) -> None:
        log(INFO, "\t├──> fedloop: task %s, strategy %s, K = %d partitions, rank %d, rounds %d (done %d)",
            self.config.task, self.config.strategy, self.config.clients, self.config.rank, self.config.rounds,
            self.server.round)
        log(INFO, "\t└──> latency budget τ̄ = %.4g s, round timeout %g s", self.server.tau_bar,
            self.settings.round_timeout)

    def _note(self, text: str) -> None:
        self.notes.append(f"round {self.server.round + 1}: {text}")
        log(WARNING, "fedloop: %s", text)

    def global_arrays(self) -> ArrayRecord:
        return _to_record(_pack(self.server.global_factors, self.server.global_head))

    def _nodes(self, grid: Grid) -> list[int]:
        if not self._waited:  # before the first round: wait for min_available_nodes
            deadline = time.monotonic() + self.settings.wait_timeout
            while len(nodes := list(grid.get_node_ids())) < self.min_available_nodes:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {len(nodes)} of the {self.min_available_nodes} nodes needed connected "
                                       f"within {self.settings.wait_timeout:g} s")
                time.sleep(0.5)
            self._waited = True
        return sorted(n for n in grid.get_node_ids() if n not in self._lost)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Phase 1 messages: global factors, the run config and the round index, to every live node."""
        self._grid = grid
        nodes = self._nodes(grid)
        conf = ConfigRecord({"server-round": server_round, "round-index": self.server.round,
                             "run-config": _config_json(self.config)})
        record = RecordDict({self.arrayrecord_key: self.global_arrays(), self.configrecord_key: conf})
        self._phase1_nodes = nodes
        log(INFO, "configure_train: round %d to %d nodes", self.server.round + 1, len(nodes))
        return [Message(record, dst_node_id=n, message_type=MessageType.TRAIN, ttl=self.settings.round_timeout)
                for n in nodes]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Profiles in, policy, phase 2 (uploads), rank-wise aggregation, ledger and checkpoint."""
        self._replies = list(replies)
        row = self.server.step(self)  # the strategy is the round's client pool: train() and upload() below
        for callback in self.callbacks:
            callback(dict(row))
        cfg, out = self.config, Path(self.config.out)
        if self.server.round % cfg.checkpoint_every == 0 or self.server.round == cfg.rounds:
            self.server.save_checkpoint(out)
            self.server.history.save(out)
        metrics = MetricRecord({k: float(v) for k, v in row.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})
        return self.global_arrays(), metrics

    # -- the client pool of fedloop.Server.step ---------------------------------------------------
    def _drop(self, nid: int, status: list, reason: str, lost: bool) -> None:
        if lost:
            self._lost.add(nid)
        self._note(f"node {nid}: {reason}")
        if (k := self._part.get(nid)) is not None:
            status[k] = f"error: {reason}"

    def train(self, t: int) -> TrainReport:
        """Phase 1's replies (received by Flower before ``aggregate_train``) as the pool's report:
        a node that answered with an error is dropped from this round; one the SuperLink reports
        gone, or that did not answer within the round timeout, is not contacted again."""
        K, r = self.config.clients, self.server.shape.rank
        profiles, losses = np.zeros((K, r + 1)), np.full(K, np.nan)
        # a partition whose last known node is lost says so; one that never had a node, "no node"
        status = ["error: no node"] * K
        for nid in self._lost:
            if (k := self._part.get(nid)) is not None:
                status[k] = "error: node lost"
        self._node_of = {}
        good = [msg for msg in self._replies if not msg.has_error()]
        for msg in self._replies:
            if msg.has_error():
                self._drop(msg.metadata.src_node_id, status, _reason(msg), msg.error.code in _GONE)
        answered = {msg.metadata.src_node_id for msg in self._replies}
        for nid in set(self._phase1_nodes) - answered:
            self._drop(nid, status, f"no reply within {self.settings.round_timeout:g} s", True)
        for msg in good:
            nid, content = msg.metadata.src_node_id, msg.content
            k = int(content["metrics"]["partition-id"])
            if "fatal" in content:
                raise RunFailed(str(content["fatal"]["reason"]))
            if k in self._node_of:
                self._note(f"node {nid} claims partition {k} of node {self._node_of[k]}: ignored")
                continue
            self._part[nid], self._node_of[k] = k, nid
            profiles[k] = content["profile"].to_numpy_ndarrays()[0]
            losses[k] = float(content["metrics"]["train-loss"])
            status[k] = "ok"
        return TrainReport(profiles=profiles, losses=losses, status=status)

    def upload(self, t: int, sent: list, keep: dict, bandwidth_hz: dict) -> dict:
        """Phase 2: each scheduled node gets its own keep count and bandwidth; replies are its
        SOFT payload and head, or the reason it did not deliver."""
        msgs, part_of = [], {}
        for k in sent:
            nid = self._node_of[k]
            part_of[nid] = k
            conf = ConfigRecord({"round-index": t, "keep": int(keep[k]), "bandwidth-hz": float(bandwidth_hz[k]),
                                 "server-round": self.server.round + 1})
            msgs.append(Message(RecordDict({"config": conf}), dst_node_id=nid, message_type=UPLOAD,
                                ttl=self.settings.round_timeout))
        out: dict[int, Any] = {}
        for msg in self._grid.send_and_receive(msgs, timeout=self.settings.round_timeout):
            nid = msg.metadata.src_node_id
            if (k := part_of.get(nid)) is None:
                continue
            if msg.has_error():
                if msg.error.code in _GONE:
                    self._lost.add(nid)
                out[k] = _reason(msg)
                continue
            data = bytes(msg.content["upload"]["payload"])
            _, head = _unpack(_from_record(msg.content["head"]))
            out[k] = Upload(payload=data, bits=8 * len(data), head=head)
        for nid, k in part_of.items():
            if k not in out:
                self._lost.add(nid)
                out[k] = f"no upload within {self.settings.round_timeout:g} s"
        return out

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def execute(self, grid: Grid):
        """Run the remaining rounds on ``grid`` (Flower's ``Strategy.start``); saves the ledger."""
        result = self.start(grid, self.global_arrays(), num_rounds=self.remaining_rounds,
                            timeout=self.settings.round_timeout)
        out = Path(self.config.out)
        self.server.save_checkpoint(out)
        self.server.history.save(out)
        return result


def make_server_app(config: RunConfig | None = None, settings: FlowerSettings | None = None,
                    on_done=None, callbacks=()) -> ServerApp:
    """A ServerApp running :class:`TsfaStrategy`. With ``config=None`` the run is read from the
    Flower run config (``context.run_config``, see the module docstring). ``on_done(strategy)``
    is called at the end (tests use it to read the ledger); ``callbacks`` get each round's
    ledger row (as :func:`fedloop.run`'s) and are closed at the end."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if config is None:
            cfg, st = config_from_run_config(context.run_config)
        else:
            cfg, st = config, settings or FlowerSettings()
        out = check_run_folder(cfg.out)
        if st.resume:  # verified before the lock file is touched
            load_checkpoint(out)
        try:
            with RunFolder(out):  # one server per run folder
                strategy = TsfaStrategy(cfg, st, callbacks)
                strategy.execute(grid)
        finally:
            for callback in callbacks:
                if callable(getattr(callback, "close", None)):
                    callback.close()
        if on_done is not None:
            on_done(strategy)

    return app


server_app = make_server_app()


def run_flower(config: RunConfig, *, num_supernodes: int | None = None, settings: FlowerSettings | None = None,
               backend_config: dict | None = None):
    """Run ``config`` as a Flower simulation (Ray backend) with one virtual SuperNode per client;
    returns the :class:`~fedloop.History` (also saved to ``config.out``)."""
    from flwr.simulation import run_simulation

    done = {}
    app = make_server_app(config, settings, on_done=lambda s: done.setdefault("strategy", s))
    backend = backend_config or {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                 "init_args": {"include_dashboard": False}}
    run_simulation(server_app=app, client_app=client_app, num_supernodes=num_supernodes or config.clients,
                   backend_name="ray", backend_config=backend)
    if "strategy" not in done:
        raise RuntimeError("the Flower simulation ended before the strategy finished (see the log)")
    return done["strategy"].history
