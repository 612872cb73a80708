"""TSFA + SOFT on Flower (>= 1.42, the Message API): a strategy, a ServerApp and a ClientApp.

Install the extra: ``pip install 'tsfa[flower]'``. ``fedloop`` itself never imports ``flwr``;
this module does, on import. The server half (the strategy, the ServerApp, the run config) is
here; the node half (the ClientApp) is :mod:`fedloop.flower_client`, the bytes of each upload
:mod:`fedloop.flower_codec`, the simulation runner :mod:`fedloop.flower_run`; this module
re-exports ``client_app``, ``client_train``, ``client_upload``, ``run_flower`` and ``free_ports``.

Protocol (two Flower message exchanges per FL round, both inside one Flower round):

1. ``configure_train`` sends every connected node a ``train`` message: the global LoRA factors
   and head as one safetensors blob (``ConfigRecord["global"]``; for ``svd`` and ``ideal`` also
   the deltas folded into the frozen weights so far, ``ConfigRecord["folded"]``), the run's
   :class:`~fedloop.RunConfig` as JSON and the round index. The node (partition ``k`` = its ``partition-id`` node
   config) trains exactly as ``fedloop`` does (:func:`fedloop.client.train_client`, seeded from
   (seed, round, k)), keeps the received and trained factors in its ``Context.state``, and
   replies with its error profile e_k(s), s = 0..r, and its partition id. With error feedback
   the node also keeps its residual there (``_residual_now``); for rotated feedback the message
   carries the server's changes of basis since the node last answered (``basis``).
2. ``aggregate_train`` draws the round's channel for partitions 0..K−1 **on the server**
   (``fedloop``'s cell: fixed positions from the seed, Rayleigh fading per round; the nodes
   report no channel state), runs the strategy's policy (``tsfa``: the ``OnlineAllocator``),
   then sends each scheduled node a ``train.upload`` message with **its own** keep count and
   bandwidth in its own ``ConfigRecord``. The node replies with its strategy's upload as bytes
   (:mod:`fedloop.flower_codec`: ``payload``, and ``factors`` for ``ideal``) and its head. The server
   checks and decodes them, aggregates with the data weights, re-orthogonalises, feeds the round's
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
``wait-timeout`` (s to wait for them, default 600), ``resume`` (continue from the
checkpoint in ``out``, :mod:`fedloop.checkpoint`) and ``poll-interval`` (s between the server's
pulls for replies, default 0.05: :class:`PollingGrid`). ``out`` should be an absolute path in a
deployment (the ServerApp runs in its own process and working directory). An hf task's paths
must exist on the SuperLink's machine and on every SuperNode's; each builds the task with its
own ``device``.

Every strategy of :data:`fedloop.strategies.STRATEGIES` runs here. The ledger's uplink bits are
8 × the bytes each node sent plus the head (as in process), its downlink bits 8 × the bytes each
node received. :func:`run_flower` runs a simulation on Flower's supported path (a SuperLink in
simulation mode and ``flwr run``); :mod:`fedloop.flower_node` runs long-lived SuperNodes.
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
    from flwr.common import log
    from flwr.common.constant import ErrorCode
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("fedloop.flower needs Flower >= 1.42: pip install 'tsfa[flower]'") from exc

from fedloop.checkpoint import RunFolder, check_run_folder, load_checkpoint
from fedloop.client import RunFailed, TrainReport, Upload
from fedloop.config import RunConfig
from fedloop.flower_client import (
    FOLDING,
    adapter_spec,
    client_app,
    client_train,
    client_upload,
    folded_shapes,
    pack_adapter,
    unpack_adapter,
)
from fedloop.flower_codec import decode as decode_upload
from fedloop.flower_codec import pack_tensors, unpack_tensors
from fedloop.server import Server
from fedloop.strategies import STRATEGIES

__all__ = ["FlowerSettings", "TsfaStrategy", "PollingGrid", "client_app", "client_train", "client_upload",
           "server_app", "make_server_app", "config_from_run_config", "run_config_of", "run_flower", "free_ports"]

UPLOAD = f"{MessageType.TRAIN}.upload"


@dataclass
class FlowerSettings:
    """Flower-side settings of a run (not part of the :class:`RunConfig`)."""

    round_timeout: float = 300.0
    min_nodes: int | None = None
    wait_timeout: float = 600.0
    resume: bool = False
    poll_interval: float = 0.05

    def __post_init__(self):
        for name, low, high in (("round_timeout", 0.001, 1e7), ("wait_timeout", 0.0, 1e7),
                                ("poll_interval", 0.001, 60.0)):
            value, key = getattr(self, name), name.replace("_", "-")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"{key} must be a number of seconds in [{low:g}, {high:g}]; got {key} = {value!r}")
            setattr(self, name, float(value))
        if self.min_nodes is not None and (isinstance(self.min_nodes, bool) or not isinstance(self.min_nodes, int)
                                           or self.min_nodes < 0):
            raise ValueError(f"min-nodes must be an integer >= 0; got min-nodes = {self.min_nodes!r}")
        self.min_nodes = self.min_nodes or None  # 0: as absent (wait for every client's node)
        if not isinstance(self.resume, bool):
            raise ValueError(f"resume must be true or false; got resume = {self.resume!r}")


# -- run config --------------------------------------------------------------------------------
_FLOWER_KEYS = {"round-timeout": "round_timeout", "min-nodes": "min_nodes", "wait-timeout": "wait_timeout",
                "resume": "resume", "poll-interval": "poll_interval"}


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
def _to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict=dict(tensors)) if tensors else ArrayRecord()



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


def _short_object_backoff(grid: Grid, backoff: float) -> None:
    """The deployment Grid pulls a reply's objects with Flower's retry (1 s, 2 s, ... for an
    object the node has not pushed yet, which happens when a reply is pulled the moment it
    arrives): retry after ``backoff`` seconds instead (Flower 1.42's ``HttpGrid``; a grid without
    module-level ``pull_objects``, such as the simulation's, is left as it is)."""
    import sys

    from fedloop.flower_node import patch_object_pull_backoff

    module = sys.modules.get(type(grid).__module__)
    if module is not None and getattr(module, "pull_objects", None) is not None:
        try:
            patch_object_pull_backoff(module, min(backoff, 1.0))
        except RuntimeError as exc:  # another Flower release: keep its own retry
            log(WARNING, "fedloop: %s", exc)


class PollingGrid(Grid):
    """A Grid that waits for replies by pulling every ``poll_interval`` seconds.

    Flower 1.42's deployment Grid (``HttpGrid.send_and_receive``) sleeps a fixed 3 s between
    pulls, and the simulation's ``InMemoryGrid`` 0.1 s; this one pushes and pulls through the
    wrapped grid's public ``push_messages`` / ``pull_messages``, so a round waits at most
    ``poll_interval`` after the last reply arrived. Everything else is the wrapped grid's."""

    def __init__(self, grid: Grid, poll_interval: float = 0.05):
        self.grid, self.poll_interval = grid, float(poll_interval)
        self.waits: list[float] = []  # wall time of each send_and_receive (push, the nodes' work, pull)
        _short_object_backoff(grid, self.poll_interval)

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def push_messages(self, messages):
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        t0 = time.monotonic()
        messages = list(messages)
        if not messages:
            return []
        pending = set(self.grid.push_messages(messages))
        end = None if timeout is None else t0 + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.poll_interval if end is None else max(0.0, min(self.poll_interval,
                                                                            end - time.monotonic())))
        self.waits.append(time.monotonic() - t0)
        return replies

    def __getattr__(self, name):  # anything else a concrete grid offers
        return getattr(self.grid, name)


class TsfaStrategy(FedAvg):
    """FedAvg subclass running TSFA's allocation and SOFT's rank-wise aggregation (module docstring).

    Args:
        config: the run (task, any strategy of :data:`~fedloop.strategies.STRATEGIES`, K = ``clients``
            partitions, wireless settings, ``out`` folder for checkpoints and the ledger).
        settings: :class:`FlowerSettings` (round timeout, nodes to wait for, resume).

    The server state is a :class:`fedloop.Server` (``self.server``): global factors and head, the
    policy (with the Lyapunov queue), the round counter and the ledger (``self.history``). The
    strategy itself is the server's client pool (``train`` and ``upload``). The state is
    checkpointed to ``config.out`` (:mod:`fedloop.checkpoint`) every ``checkpoint_every`` rounds and at the
    end, with ``history.json``; ``settings.resume`` continues from there.
    """

    def __init__(self, config: RunConfig, settings: FlowerSettings | None = None, callbacks=()):
        if config.strategy not in STRATEGIES:  # RunConfig checks this too
            raise ValueError(f"strategy must be one of {STRATEGIES}; got strategy = {config.strategy!r}")
        if config.value_bits == "auto":
            raise ValueError("value_bits = 'auto' runs in process only (the nodes do not report rounding profiles); "
                             "use value_bits = 32, 16, 8 or 4 on Flower")
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
        self.broadcast_bits: np.ndarray | None = None  # what each partition's node received this round (bits)
        self._sent_bits: dict[int, int] = {}  # node id -> bits it was sent this round
        self._full_bits = 0  # bits of this round's message with the whole adapter
        self._view_synced: dict[int, int] = {}  # node id -> the round of the view it holds (compressed downlink)
        self._basis: dict[int, dict] = {}  # round -> its change of basis (rotated error feedback)
        self._synced: dict[int, int] = {}  # node id -> the round in whose basis it holds its residual
        self._waited = False
        self._round_start: float | None = None
        self._last_end: float | None = None
        self.round_seconds: list[float] = []  # wall time of each Flower round run here (both exchanges, server work)
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
        return _to_record(pack_adapter(self.server.global_factors, self.server.global_head))

    def global_bytes(self, factors: bool = True) -> bytes:
        """What phase 1 sends a node: the factors the clients train from (the global ones, or
        their view under a compressed downlink; ``factors`` False: none) and the head, as one
        safetensors blob (one Flower object instead of one per tensor and chunk)."""
        return pack_tensors(pack_adapter(self.server.client_factors if factors else None, self.server.global_head))

    def folded_bytes(self) -> bytes:
        """svd and ideal: every module's delta folded into the frozen weights so far (zeros where
        none yet), as safetensors ``folded/<module>``; empty bytes before the first fold and for
        the other strategies."""
        folded = self.server.folded
        if self.config.strategy not in FOLDING or all(d is None for d in folded.values()):
            return b""
        shapes = folded_shapes(self.server.global_factors)
        return pack_tensors({f"folded/{n}": d if d is not None else torch.zeros(shapes[f"folded/{n}"][0])
                             for n, d in folded.items()})

    def basis_bytes(self, nodes: list[int]) -> tuple[list[int], bytes] | None:
        """Rotated error feedback: the re-orthogonalisations' changes of basis M (per module, r × r
        float64, safetensors ``<round>/<module>``) of the rounds since the oldest round in whose
        basis a node is known to hold its residual (its last answered phase 1), and those rounds;
        None when there are none. Older ones are forgotten."""
        t = self.server.round
        first = min((self._synced.get(n, t) for n in nodes), default=t)
        self._basis = {b: m for b, m in self._basis.items() if b >= first}
        rounds = sorted(self._basis)
        if not rounds:
            return None
        return rounds, pack_tensors({f"{b}/{n}": M for b in rounds for n, (M, _) in self._basis[b].items()})

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
        self._round_start = time.perf_counter()
        folded = self.folded_bytes()
        if folded:
            conf["folded"] = folded
        basis = self.basis_bytes(nodes)
        if basis:
            conf["basis-rounds"], conf["basis"] = basis
        # downlink: what each node really receives, the bytes of the global factors (or the round's compressed
        # broadcast, to a node that holds the last view) and head, for svd and ideal of the deltas folded into the
        # frozen weights so far, for rotated error feedback of the changes of basis
        common = len(folded) + (len(basis[1]) if basis else 0)
        full, delta, t = self.global_bytes(), self.server.last_broadcast, self.server.round
        self._full_bits = 8 * (len(full) + common)
        self._sent_bits, messages = {}, []
        for n in nodes:
            if delta is not None and self._view_synced.get(n) == t - 1:
                parts = {"global": self.global_bytes(factors=False), "delta": delta}
            else:
                parts = {"global": full}
            self._sent_bits[n] = 8 * (sum(len(b) for b in parts.values()) + common)
            record = RecordDict({self.configrecord_key: ConfigRecord({**dict(conf), **parts})})
            messages.append(Message(record, dst_node_id=n, message_type=MessageType.TRAIN,
                                    ttl=self.settings.round_timeout))
        self._phase1_nodes = nodes
        log(INFO, "configure_train: round %d to %d nodes", self.server.round + 1, len(nodes))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Profiles in, policy, phase 2 (uploads), rank-wise aggregation, ledger and checkpoint."""
        self._replies = list(replies)
        row = self.server.step(self)  # the strategy is the round's client pool: train() and upload() below
        if self.server.rotates:  # this round's change of basis goes out with the next broadcast
            self._basis[self.server.round - 1] = self.server.basis
        if self._round_start is not None:  # wall time from the end of the previous round (or this one's start)
            now = time.perf_counter()
            seconds = now - (self._last_end if self._last_end is not None else self._round_start)
            self._last_end = now
            self.round_seconds.append(seconds)
            row["flower_round_s"] = seconds  # in the ledger (history.json, rounds.csv)
            waits = self._grid.waits if isinstance(self._grid, PollingGrid) else []
            log(INFO, "fedloop: round %d took %.3f s (wall time; message exchanges %s s, the rest server work)",
                self.server.round, seconds, " + ".join(f"{w:.3f}" for w in waits))
            if isinstance(self._grid, PollingGrid):
                self._grid.waits.clear()
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
            self._synced[nid] = self._view_synced[nid] = t
            if "residual" in content:
                self._note(f"node {nid}: {content['residual']['lost']}: its residual is dropped")
            profile = np.asarray(content["metrics"]["profile"], dtype=np.float64)
            if profile.shape != (r + 1,):
                self._note(f"node {nid}: profile of {profile.size} values, expected {r + 1}: dropped")
                status[k] = "error: malformed profile"
                continue
            profiles[k] = profile
            losses[k] = float(content["metrics"]["train-loss"])
            status[k] = "ok"
        # downlink per partition: what its node was sent (the whole adapter where no node is known)
        node = {k: nid for nid, k in self._part.items() if nid in self._sent_bits}
        self.broadcast_bits = np.array([self._sent_bits[node[k]] if k in node else self._full_bits
                                        for k in range(K)], dtype=np.int64)
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
            try:
                upload = msg.content["upload"]
                parts = {name: upload[name] for name in upload.keys() if name != "head"}
                payload = decode_upload(self.server, parts, keep[k])  # validated (fedloop.flower_codec)
                spec = adapter_spec({}, self.server.global_head)
                _, head = unpack_adapter(unpack_tensors(upload["head"], spec, "the head"))
            except (KeyError, TypeError, ValueError) as exc:
                out[k] = f"rejected upload: {exc}"
                continue
            out[k] = Upload(payload=payload, bits=8 * sum(len(b) for b in parts.values()), head=head)
        for nid, k in part_of.items():
            if k not in out:
                self._lost.add(nid)
                out[k] = f"no upload within {self.settings.round_timeout:g} s"
        return out

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def execute(self, grid: Grid):
        """Run the remaining rounds on ``grid`` (Flower's ``Strategy.start``); saves the ledger."""
        result = self.start(PollingGrid(grid, self.settings.poll_interval), self.global_arrays(),
                            num_rounds=self.remaining_rounds, timeout=self.settings.round_timeout)
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


# -- simulation: Flower's supported path (a SuperLink in simulation mode, `flwr run`) ---------------
def run_config_of(config: RunConfig, settings: FlowerSettings | None = None) -> dict:
    """The Flower run config (nested as in ``[tool.flwr.app.config]``; Flower flattens it to
    ``linear.dim`` etc.) that :func:`config_from_run_config` reads back as ``config`` and ``settings``."""
    settings = settings or FlowerSettings()

    def value(v):
        if v is None:
            return "none"
        if isinstance(v, (list, tuple)):
            return ",".join(str(x) for x in v)
        return v

    out: dict[str, Any] = {}
    for key, v in config.to_dict().items():
        if key in ("linear", "distill", "hf"):
            if v:
                out[key] = {k.replace("_", "-"): value(x) for k, x in v.items()}
        else:
            out[key.replace("_", "-")] = value(v)
    out.update({"round-timeout": settings.round_timeout, "min-nodes": settings.min_nodes or 0,
                "wait-timeout": settings.wait_timeout, "resume": settings.resume,
                "poll-interval": settings.poll_interval})
    return out


# the simulation runner lives in fedloop.flower_run (it imports this module); its names are this module's too
from fedloop.flower_run import free_ports, run_flower  # noqa: E402
