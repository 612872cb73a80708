"""TSFA + SOFT on Flower: every strategy through Flower's messages in this process (LocalGrid),
the codec's checks, faults; the simulation (a SuperLink in simulation mode, Ray) against the
in-process loop and resume; a real SuperLink with long-lived SuperNodes as separate processes."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="needs the [flower] extra")

import uuid  # noqa: E402

from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.app.error import Error  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402
from flwr.common.serde import message_from_proto, message_to_proto  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from fedloop import History, RunConfig, run  # noqa: E402
from fedloop import flower as fl  # noqa: E402
from fedloop import flower_client as fc  # noqa: E402
from fedloop.checkpoint import RunFolder, load_checkpoint  # noqa: E402
from fedloop.strategies import STRATEGIES  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "flower_app"
BIN = Path(sys.executable).parent


def lin(out, **kw):
    base = dict(task="linear", strategy="tsfa", rounds=3, clients=4, rank=4, keep=1, lr=0.02, checkpoint_every=1,
                out=str(out), linear={"dim": 16, "samples": 64, "test_samples": 256})
    base.update(kw)
    return RunConfig(**base)


def checkpoint_of(folder):
    """A run folder's verified checkpoint: its state with the global factors as {module: (A, B)}."""
    tensors, state = load_checkpoint(folder)
    names = sorted({k.split("/")[1] for k in tensors if k.startswith("global/")})
    return {**state, "global_factors": {n: (tensors[f"global/{n}/A"], tensors[f"global/{n}/B"]) for n in names}}


def adapter_of(folder):
    return checkpoint_of(folder)["global_factors"]


def assert_same_adapter(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        for i in range(2):
            torch.testing.assert_close(a[name][i], b[name][i], rtol=0, atol=atol)


def ledger(h: History):
    """The bits ledger: per client and round (status kind, keep, bits), per round the totals."""
    clients = [(c["round"], c["client"], c["status"].split(":")[0], c["keep"], c["uplink_bits"]) for c in h.clients]
    rounds = [(r["round"], r["uplink_bits"], r["scheduled"], r["dropped"]) for r in h.rounds]
    return clients, rounds


# -- fast: configuration -------------------------------------------------------------------------
def test_run_config_maps_to_run_config():
    cfg, st = fl.config_from_run_config({
        "task": "linear", "rounds": 7, "local-steps": 3, "lr": 1, "cap-factor": "none", "linear.dim": 8,
        "linear.test-samples": 64, "round-timeout": 5.0, "min-nodes": 2, "resume": True, "strategy": "fixed"})
    assert cfg.rounds == 7 and cfg.local_steps == 3 and cfg.lr == 1.0 and cfg.cap_factor is None
    assert cfg.linear == {"dim": 8, "test_samples": 64} and cfg.strategy == "fixed"
    assert st == fl.FlowerSettings(round_timeout=5.0, min_nodes=2, resume=True)
    with pytest.raises(ValueError, match="unknown config keys"):
        fl.config_from_run_config({"rouns": 3})


def test_run_config_of_is_read_back_as_the_run():
    from flwr.common.config import flatten_dict

    cfg = lin("/tmp/x", strategy="svd", alpha=8.0, cap_factor=None)
    st = fl.FlowerSettings(round_timeout=7.0, min_nodes=3, poll_interval=0.2)
    assert fl.config_from_run_config(flatten_dict(fl.run_config_of(cfg, st))) == (cfg, st)
    with pytest.raises(ValueError, match="poll-interval"):
        fl.FlowerSettings(poll_interval=0)


def test_strategy_rejects_what_flower_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="in process only"):
        fl.TsfaStrategy(lin(tmp_path, strategy="tsfa", value_bits="auto"))
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        fl.TsfaStrategy(lin(tmp_path / "none"), fl.FlowerSettings(resume=True))
    s = fl.TsfaStrategy(lin(tmp_path))
    assert isinstance(s, fl.FedAvg) and s.remaining_rounds == 3 and s.min_available_nodes == 4


def test_the_app_layout_is_what_flwr_run_accepts():
    from flwr.cli.config_utils import load_and_validate

    config, warnings = load_and_validate(APP / "pyproject.toml")
    comps = config["tool"]["flwr"]["app"]["components"]
    assert comps == {"serverapp": "tsfa_flower_app.server_app:app", "clientapp": "tsfa_flower_app.client_app:app"}
    from flwr.common.config import flatten_dict

    flat = flatten_dict(config["tool"]["flwr"]["app"]["config"])
    cfg, st = fl.config_from_run_config(flat)
    assert cfg.task == "linear" and cfg.strategy == "tsfa" and not st.resume
    # `flwr run -c` can override only listed keys: every RunConfig field and linear setting is listed
    listed = {k.replace("-", "_") for k in flat}
    assert {f for f in RunConfig().to_dict() if f not in ("linear", "distill", "hf")} <= listed
    from fedloop.config import HF_DEFAULTS
    from fedloop.tasks import DISTILL_DEFAULTS, LinearTask

    assert set(cfg.linear) == set(LinearTask(cfg).settings)
    assert cfg.distill == DISTILL_DEFAULTS
    assert cfg.hf == HF_DEFAULTS


# -- Flower's message path in this process: every strategy -----------------------------------------
class LocalGrid(Grid):
    """A Flower Grid whose nodes are the real ClientApp in this process: every message and reply
    goes through Flower's protobuf serde (what travels between SuperLink and SuperNode), each node
    has its own Context (partition, state). Records the bytes of what was sent each round."""

    def __init__(self, app, clients):
        self.app, self._run = app, None
        self.contexts = {100 + k: Context(run_id=1, node_id=100 + k, state=RecordDict(), run_config={},
                                          node_config={"partition-id": k, "num-partitions": clients})
                         for k in range(clients)}
        self.replies: dict[str, Message] = {}
        self.uplink: dict[tuple[int, int], int] = {}  # (round, partition) -> bytes of the upload's adapter parts
        self.downlink: dict[int, int] = {}  # round -> bytes of the global adapter, head (and folded weights)

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            msg = message_from_proto(message_to_proto(msg))
            conf = msg.content["config"]
            if msg.metadata.message_type == "train":  # every byte part: adapter or broadcast, folded, basis
                self.downlink[int(conf["round-index"]) + 1] = sum(
                    len(conf[part]) for part in ("global", "delta", "folded", "basis") if part in conf)
            try:
                reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - as a SuperNode reports a failing ClientApp
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=repr(exc)), reply_to=msg)
            reply = message_from_proto(message_to_proto(reply))
            if not reply.has_error() and "upload" in reply.content:
                up = reply.content["upload"]
                key = (int(conf["round-index"]) + 1, int(reply.content["metrics"]["partition-id"]))
                self.uplink[key] = sum(len(up[name]) for name in up.keys() if name != "head")
            self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def run_local(cfg, clients=None, app=None):
    """``cfg`` through TsfaStrategy and the real ClientApp (or ``app``) over a :class:`LocalGrid`."""
    from flwr.supercore.task_identity import TaskIdentity

    grid = LocalGrid(app or fl.client_app, clients or cfg.clients)
    saved = {k: TaskIdentity.__dict__[k] for k in ("_task_id", "_run_id", "_node_id")}
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # who sends (the ServerApp)
    try:
        with RunFolder(cfg.out):
            strategy = fl.TsfaStrategy(cfg, fl.FlowerSettings(poll_interval=0.001))
            strategy.execute(grid)
    finally:
        for k, v in saved.items():
            setattr(TaskIdentity, k, v)
    return strategy, grid


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs_on_flower_and_its_bits_are_what_was_sent(tmp_path, strategy):
    cfg = lin(tmp_path / "flower", strategy=strategy, rounds=2, keep=2)
    s, grid = run_local(cfg)
    h = s.history
    assert len(h.rounds) == 2 and h.meta["engine"] == "flower"
    assert all(np.isfinite(r["test_loss"]) and r["flower_round_s"] > 0 for r in h.rounds)
    head_bits = s.server.head_bits
    for c in h.clients:  # uplink: 8 x the bytes each node sent (plus the head, as in process); downlink: received
        assert c["status"] in ("ok", "skipped"), c
        sent = grid.uplink.get((c["round"], c["client"]))
        assert c["uplink_bits"] == (0 if sent is None else 8 * sent + head_bits)
        assert c["downlink_bits"] == 8 * grid.downlink[c["round"]]
    assert sum(grid.uplink.values()) > 0 or strategy == "head"
    ref = run(lin(tmp_path / "fedloop", strategy=strategy, rounds=2, keep=2), progress=False)
    if strategy in SAME_BITS:  # the same bytes as in process, round for round
        assert ledger(h) == ledger(ref)
    else:  # svd, ffa: safetensors headers; ideal: its full local factors travel too (docs/flower.md)
        assert h.rounds[0]["uplink_bits"] > ref.rounds[0]["uplink_bits"]
    if strategy in FOLDING_STRATEGIES:  # the nodes train on the folded frozen weights: downlink grows
        assert h.clients[-1]["downlink_bits"] > h.clients[0]["downlink_bits"]
    print(f"{strategy}: {[round(r['flower_round_s'], 3) for r in h.rounds]} s per round")


SAME_BITS = ("tsfa", "fedit", "random", "fixed", "lowrank", "topk", "head", "flasc")
FOLDING_STRATEGIES = ("svd", "ideal")


def test_codec_rejects_malformed_uploads(tmp_path):
    from fedloop.flower_codec import MAX_BYTES, decode, encode, pack_tensors
    from fedloop.server import Server

    server = Server(lin(tmp_path, strategy="ffa"))
    glob = server.global_factors
    local = {n: (A, B + 0.1) for n, (A, B) in glob.items()}
    good = encode(server.config, glob, local, 4, 0, 0)
    assert set(decode(server, good, 4)) == set(glob)
    name = next(iter(glob))
    B = glob[name][1]
    bad = {n: b for n, (_, b) in local.items()}
    cases = {
        "tensors": {**{f"{n}/B": b for n, b in bad.items() if n != name}, "evil/B": B},
        "tensor .* is": {f"{n}/B": (b if n != name else torch.zeros(B.shape[0] + 1, B.shape[1])) for n, b in
                         bad.items()},
        "non-finite": {f"{n}/B": (b if n != name else torch.full_like(B, float("nan"))) for n, b in bad.items()},
    }
    for problem, tensors in cases.items():
        with pytest.raises(ValueError, match=problem):
            decode(server, {"payload": pack_tensors(tensors)}, 4)
    with pytest.raises(ValueError, match="not a valid safetensors"):
        decode(server, {"payload": b"\x08" + b"\0" * 7 + b"{junk"}, 4)
    with pytest.raises(ValueError, match="upload parts"):
        decode(server, {"payload": good["payload"], "extra": b""}, 4)

    class Huge(bytes):
        def __len__(self):
            return MAX_BYTES + 1

    with pytest.raises(ValueError, match="exceed the limit"):
        decode(server, {"payload": Huge(b"x")}, 4)
    # SOFT's wire payload travels as is; the server's check (the strategy's decode) validates it
    wire = Server(lin(tmp_path / "w", strategy="tsfa"))
    data = encode(wire.config, wire.global_factors, {n: (A + 0.1, B + 0.1) for n, (A, B) in
                                                     wire.global_factors.items()}, 2, 0, 0)
    assert wire.strategy.decode(decode(wire, data, 2), 2, wire).keep == 2
    with pytest.raises(ValueError):
        wire.strategy.decode(decode(wire, {"payload": data["payload"][:-3]}, 2), 2, wire)
    # svd: shape of the truncation must fit the allocation
    svd = Server(lin(tmp_path / "s", strategy="svd"))
    data = encode(svd.config, svd.global_factors, {n: (A + 0.1, B + 0.1) for n, (A, B) in
                                                   svd.global_factors.items()}, 2, 0, 0)
    assert len(decode(svd, data, 2)) == len(svd.global_factors)
    with pytest.raises(ValueError, match="expected"):
        decode(svd, data, 3)


# -- Ray simulation ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sim3(tmp_path_factory):
    """A 3-round Flower simulation (Ray, 4 virtual SuperNodes) and the same run in-process."""
    d = tmp_path_factory.mktemp("sim")
    t0 = time.perf_counter()
    h = fl.run_flower(lin(d / "flower"))
    seconds = time.perf_counter() - t0
    ref = run(lin(d / "fedloop"), progress=False)
    return d, h, ref, seconds


@pytest.mark.slow
def test_simulation_matches_fedloop(sim3):
    d, h, ref, seconds = sim3
    assert h.meta["engine"] == "flower" and len(h.rounds) == 3
    assert ledger(h) == ledger(ref)  # same keep counts, same encoded bytes, same statuses
    assert any(c["keep"] < 4 for c in h.clients)  # TSFA really sparsified
    a, b = checkpoint_of(d / "flower"), checkpoint_of(d / "fedloop")
    assert_same_adapter(a["global_factors"], b["global_factors"])
    assert a["policy"] == b["policy"] and a["round"] == b["round"] == 3  # the Lyapunov queue too
    for x, y in zip(h.rounds, ref.rounds, strict=True):
        assert x["test_loss"] == pytest.approx(y["test_loss"], rel=1e-6)
        assert x["latency_s"] == pytest.approx(y["latency_s"], rel=1e-9)
        assert "covariance_sq" not in x  # the server never sees the clients' full factors
    print(f"Flower simulation: 3 rounds in {seconds:.0f} s")  # its speed is measured in benchmarks, not asserted


@pytest.mark.slow
def test_simulation_resumes_from_its_checkpoint(sim3, tmp_path):
    d, _, _, _ = sim3
    shutil.copytree(d / "flower", tmp_path / "flower")
    h = fl.run_flower(lin(tmp_path / "flower", rounds=5), settings=fl.FlowerSettings(resume=True))
    full = run(lin(tmp_path / "full", rounds=5), progress=False)
    assert len(h.rounds) == 5 and ledger(h) == ledger(full)
    assert_same_adapter(adapter_of(tmp_path / "flower"), adapter_of(tmp_path / "full"))
    # the in-process loop resumes a Flower checkpoint as well (one format)
    shutil.copytree(d / "flower", tmp_path / "mixed")
    run(lin(tmp_path / "mixed", rounds=5), resume=True, progress=False)
    assert_same_adapter(adapter_of(tmp_path / "mixed"), adapter_of(tmp_path / "full"))


@pytest.mark.slow
def test_simulation_keeps_residuals_and_views_on_the_nodes(tmp_path):
    """On Flower's simulation engine (Ray, the node state kept by Flower across rounds), TSFA at
    4 bits with rotated error feedback and 8-bit broadcasts is the in-process run bit for bit."""
    kw = dict(strategy="tsfa", rounds=4, error_feedback="rotated", value_bits=4, downlink_value_bits=8)
    h = fl.run_flower(lin(tmp_path / "flower", **kw))
    ref = run(lin(tmp_path / "ref", **kw), progress=False)
    assert ledger(h) == ledger(ref)
    assert_same_adapter(adapter_of(tmp_path / "flower"), adapter_of(tmp_path / "ref"), atol=0)
    down = [r["downlink_bits"] for r in h.rounds]
    assert down[1] == down[2] == down[3] < down[0] / 1.5  # the 8-bit broadcast after the whole first one


def _faulty_client_app(faults):
    """The real ClientApp, except that partition k raises in (phase, round index) listed in faults."""
    app = ClientApp()

    def check(phase, msg: Message, context: Context):
        k = int(context.node_config["partition-id"])
        if (phase, int(msg.content["config"]["round-index"]), k) in faults:
            raise RuntimeError(f"radio link lost ({phase})")

    @app.train()
    def train(msg, context):
        check("train", msg, context)
        return fl.client_train(msg, context)

    @app.train("upload")
    def upload(msg, context):
        check("upload", msg, context)
        return fl.client_upload(msg, context)

    return app


def test_failing_nodes_are_dropped(tmp_path):
    """Partition 1 fails while training in round 2 (as fedloop's client_hook does); partition 0
    fails to upload in round 3, after it reported its profile and got its allocation."""
    cfg = lin(tmp_path / "flower", strategy="fixed")
    h = run_local(cfg, app=_faulty_client_app({("train", 1, 1), ("upload", 2, 0)}))[0].history

    def hook(rnd, k):
        if (rnd, k) == (2, 1):
            raise RuntimeError("radio link lost")

    ref = run(lin(tmp_path / "ref", strategy="fixed"), progress=False, client_hook=hook)
    c_h, r_h = ledger(h)
    c_r, r_r = ledger(ref)
    assert c_h[:8] == c_r[:8] and r_h[:2] == r_r[:2]  # rounds 1 and 2 as in-process
    assert h.rounds[1]["test_loss"] == pytest.approx(ref.rounds[1]["test_loss"], rel=1e-6)
    bad = [c for c in h.clients if c["round"] == 2 and c["client"] == 1][0]
    assert bad["status"].startswith("error: flower error") and "radio link lost" in bad["status"]
    lost = [c for c in h.clients if c["round"] == 3 and c["client"] == 0][0]
    assert lost["status"].startswith("error:") and "radio link lost" in lost["status"]
    assert lost["uplink_bits"] == 0 and lost["keep"] == 1  # allocated, never delivered
    assert h.rounds[2]["scheduled"] == 3 and h.rounds[2]["dropped"] == 1 and len(h.rounds) == 3
    assert h.rounds[2]["uplink_bits"] == sum(c["uplink_bits"] for c in h.clients if c["round"] == 3)
    final = checkpoint_of(tmp_path / "flower")["global_factors"]
    assert all(torch.isfinite(x).all() for pair in final.values() for x in pair)


@pytest.mark.parametrize("strategy, feedback, q", [("tsfa", "rotated", 4), ("fixed", "fixed", 32),
                                                   ("topk", "rotated", 32), ("random", "rotated", 8)])
def test_error_feedback_lives_in_the_nodes_state_and_matches_fedloop(tmp_path, strategy, feedback, q):
    """Each node keeps its residual in its Context.state; rotated feedback re-expresses it with the
    changes of basis the server broadcasts. The run is the in-process one, bit for bit, with a
    node failing in round 2 (it keeps its residual and catches up on two changes of basis)."""
    kw = dict(strategy=strategy, rounds=4, keep=1, error_feedback=feedback, value_bits=q)
    s, grid = run_local(lin(tmp_path / "flower", **kw), app=_faulty_client_app({("train", 1, 1)}))

    def hook(rnd, k):
        if (rnd, k) == (2, 1):
            raise RuntimeError("radio link lost")

    ref = run(lin(tmp_path / "ref", **kw), progress=False, client_hook=hook)
    assert ledger(s.history) == ledger(ref) and not [n for n in s.notes if "residual" in n]
    assert_same_adapter(adapter_of(tmp_path / "flower"), adapter_of(tmp_path / "ref"), atol=0)
    assert all(ctx.state.get(fc.RESIDUAL_KEY) is not None for ctx in grid.contexts.values())
    # the downlink counts the changes of basis (rotated SOFT strategies): M per module, r x r float64
    extra = [c["downlink_bits"] - s.history.clients[0]["downlink_bits"] for c in s.history.clients]
    rotates = feedback == "rotated" and strategy != "topk"  # topk does not re-orthogonalise
    basis = 64 * 2 * 4 * 4  # 2 modules, r = 4
    assert (min(extra[4:]) >= basis) == rotates and (max(extra[4:]) == 0) == (not rotates)
    ref_extra = [c["downlink_bits"] - ref.clients[0]["downlink_bits"] for c in ref.clients]
    assert set(ref_extra[4:]) == ({basis} if rotates else {0})


@pytest.mark.parametrize("strategy, kw", [
    ("tsfa", dict(downlink_value_bits=8, value_bits=4, error_feedback="rotated")),
    ("flasc", {}), ("fixed", dict(downlink_value_bits=4, downlink_keep=2))])
def test_compressed_downlink_on_flower_matches_fedloop(tmp_path, strategy, kw):
    """Under a compressed downlink each node keeps its view of the adapter in its Context.state
    and applies the round's broadcast bytes as the server does: the run is the in-process one
    bit for bit. A node that failed round 2 does not hold round 2's view, so round 3 sends it
    the view whole (and counts it); the others get the broadcast."""
    kw = dict(strategy=strategy, rounds=4, keep=1, **kw)
    s, grid = run_local(lin(tmp_path / "flower", **kw), app=_faulty_client_app({("train", 1, 1)}))

    def hook(rnd, k):
        if (rnd, k) == (2, 1):
            raise RuntimeError("radio link lost")

    ref = run(lin(tmp_path / "ref", **kw), progress=False, client_hook=hook)
    assert ledger(s.history) == ledger(ref)
    assert_same_adapter(adapter_of(tmp_path / "flower"), adapter_of(tmp_path / "ref"), atol=0)
    down = {(c["round"], c["client"]): c["downlink_bits"] for c in s.history.clients}
    whole = down[(1, 0)]
    assert down[(3, 1)] >= whole > down[(3, 0)] == down[(3, 2)] and down[(2, 0)] < whole and down[(4, 1)] < whole
    assert s.history.rounds[2]["downlink_bits"] == sum(down[(3, k)] for k in range(4))


def test_a_node_with_another_view_is_sent_the_whole_one(tmp_path):
    """A node whose view is not the one the broadcast updates fails that round with the reason,
    and the next round it is sent the view whole."""
    app = ClientApp()

    @app.train()
    def train(msg, context):
        k, t = int(context.node_config["partition-id"]), int(msg.content["config"]["round-index"])
        if (k, t) == (0, 2):
            view = context.state[fc.VIEW_KEY]
            context.state[fc.VIEW_KEY] = ConfigRecord({"round-index": 0, "tensors": view["tensors"]})
        return fl.client_train(msg, context)

    app.train("upload")(fl.client_upload)
    s, _ = run_local(lin(tmp_path / "flower", strategy="tsfa", rounds=4, downlink_value_bits=8), app=app)
    c = {(c["round"], c["client"]): c for c in s.history.clients}
    assert "updates round 2's view" in c[(3, 0)]["status"] and "holds round 1's" in c[(3, 0)]["status"]
    assert c[(4, 0)]["status"] in ("ok", "skipped") and c[(4, 0)]["downlink_bits"] == c[(1, 0)]["downlink_bits"]
    assert c[(4, 1)]["downlink_bits"] < c[(1, 0)]["downlink_bits"]


def test_a_node_refuses_a_residual_that_does_not_fit(tmp_path):
    """The residual in a node's state is validated before use: in round 3 node 0's is tampered
    with (non-finite), node 1's has the wrong shape: both fail that round with a reason naming
    it. Node 2's is labelled with round 1, whose change of basis is no longer broadcast: it is
    dropped and reported, and the node trains on."""
    from safetensors.torch import load

    app = ClientApp()

    @app.train()
    def train(msg, context):
        k, t = int(context.node_config["partition-id"]), int(msg.content["config"]["round-index"])
        state = context.state.get(fc.RESIDUAL_KEY)
        if t == 2 and k < 3 and state is not None:
            tensors = load(bytes(state["tensors"]))
            key = sorted(tensors)[0]
            if k < 2:
                tensors[key] = torch.full_like(tensors[key], float("nan")) if k == 0 else torch.zeros(1, 1)
            context.state[fc.RESIDUAL_KEY] = ConfigRecord({"round-index": 0 if k == 2 else int(state["round-index"]),
                                                        "tensors": fc.pack_tensors(tensors)})
        return fl.client_train(msg, context)

    app.train("upload")(fl.client_upload)
    s, _ = run_local(lin(tmp_path / "flower", strategy="fixed", rounds=3, error_feedback="rotated"), app=app)
    status = {c["client"]: c["status"] for c in s.history.clients if c["round"] == 3}
    assert "this node's residual" in status[0] and "non-finite" in status[0]
    assert "this node's residual" in status[1] and "expected" in status[1]
    assert status[2] == "ok" and status[3] == "ok"
    assert any("node 102" in n and "cannot be re-expressed" in n for n in s.notes)


# -- deployment: a real SuperLink and SuperNodes -----------------------------------------------
class _Procs:
    """Processes this test starts; teardown kills each one and its descendants, by pid."""

    def __init__(self, folder, env):
        self.folder, self.env, self.procs = folder, env, {}

    def start(self, name, args):
        log = open(self.folder / f"{name}.log", "w")
        p = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                             cwd=self.folder, start_new_session=True)
        self.procs[name] = p
        return p

    def kill(self, name):
        import psutil

        p = self.procs[name]
        try:
            family = psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        for proc in [p, *family]:
            try:
                os.kill(proc.pid, 9)
            except ProcessLookupError:
                pass
        p.wait(timeout=10)

    def kill_all(self):
        for name in list(self.procs):
            self.kill(name)

    def logs(self, full=False):
        return "\n".join(f"== {f.name}\n" + f.read_text()[0 if full else -3000:]
                         for f in sorted(self.folder.glob("*.log")))


def _wait(predicate, timeout, what, procs, runner=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if runner is not None and runner.poll() not in (None, 0):
            pytest.fail(f"`flwr run` failed while waiting for {what}\n{procs.logs()}")
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{procs.logs()}")


def _rounds_done(out):
    try:
        return len(json.loads((out / "history.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
def test_deployment_superlink_and_supernodes_survive_a_killed_node(tmp_path):
    import httpx

    K = 3
    link_port, *node_ports = fl.free_ports(1 + K)
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
                                      f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    env = dict(os.environ, FLWR_HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               PYTHONUNBUFFERED="1")
    out = tmp_path / "run"
    procs = _Procs(tmp_path, env)
    try:
        procs.start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link_port),
                                  "--disable-runtime-dependency-installation"])

        def link_up():
            try:
                return httpx.get(f"http://127.0.0.1:{link_port}/health", timeout=1).is_success
            except httpx.HTTPError:
                return False

        _wait(link_up, 60, "the SuperLink", procs)
        for k, port in enumerate(node_ports):  # long-lived nodes: the ClientApp in the node's own process
            procs.start(f"supernode{k}", ["python", "-m", "fedloop.flower_node", "supernode", "--poll-interval",
                                          "0.05", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                                          "--port", str(port), "--node-config",
                                          f"partition-id={k} num-partitions={K}"])
        # the round timeout is what the survivors get to answer on a loaded machine (their task takes well under
        # a second); the killed node costs it once, in round 2, and is not contacted again
        overrides = {"out": str(out), "rounds": 3, "clients": K, "checkpoint-every": 1, "round-timeout": 60.0,
                     "wait-timeout": 120.0, "strategy": "tsfa", "poll-interval": 0.05}
        t0 = time.perf_counter()
        runner = procs.start("flwr-run", ["flwr", "run", str(APP), "test", "--stream", "-c",
                                          " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())])
        _wait(lambda: _rounds_done(out) >= 1, 240, "round 1", procs, runner)
        procs.kill(f"supernode{K - 1}")  # the last node dies mid-run
        _wait(lambda: _rounds_done(out) >= 3, 240, "rounds 2 and 3", procs, runner)
        runner.wait(timeout=60)
        seconds = time.perf_counter() - t0
    finally:
        procs.kill_all()
    h = History.load(out)
    assert len(h.rounds) == 3, procs.logs()
    status = {(c["round"], c["client"]): c["status"] for c in h.clients}
    assert all(status[(1, k)] in ("ok", "skipped") for k in range(K))
    assert status[(2, K - 1)].startswith("error:") and status[(3, K - 1)].startswith("error:")
    for t in (2, 3):  # the survivors carry on
        if not all(status[(t, k)] in ("ok", "skipped") for k in range(K - 1)):
            print(procs.logs(full=True))  # pytest shows captured output in full, unlike a long assertion message
            pytest.fail(f"a surviving node failed in round {t}: {status}")
        assert h.rounds[t - 1]["dropped"] == 1
    assert sum(c["uplink_bits"] for c in h.clients if c["client"] == K - 1 and c["round"] > 1) == 0
    # round 1 is exactly the in-process loop's round 1
    from flwr.cli.config_utils import load_and_validate
    from flwr.common.config import flatten_dict

    app_config = flatten_dict(load_and_validate(APP / "pyproject.toml")[0]["tool"]["flwr"]["app"]["config"])
    cfg, _ = fl.config_from_run_config({**app_config, **overrides, "out": str(tmp_path / "ref")})
    ref = run(cfg, progress=False)
    assert ledger(h)[0][:K] == ledger(ref)[0][:K]
    assert h.rounds[0]["test_loss"] == pytest.approx(ref.rounds[0]["test_loss"], rel=1e-6)
    ck = checkpoint_of(out)
    assert ck["round"] == 3 and ck["policy"]["round"] == 3
    assert all(torch.isfinite(x).all() for pair in ck["global_factors"].values() for x in pair)
    assert np.isfinite(h.rounds[-1]["test_loss"]) and h.rounds[-1]["test_loss"] < h.rounds[0]["test_loss"] * 1.5
    per_round = [round(r["flower_round_s"], 2) for r in h.rounds]  # in the ledger; reported, not asserted
    print(f"deployment: 3 rounds, {K} SuperNodes, one killed, {seconds:.0f} s; seconds per round {per_round} "
          f"(round 2 waits the {overrides['round-timeout']:g} s round timeout for the killed node)")
