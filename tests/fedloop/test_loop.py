import dataclasses
import math

import numpy as np
import pytest
import torch

import soft
from fedloop import History, LocalPool, RunConfig, Server, run
from fedloop.checkpoint import CHECKPOINT, load_checkpoint
from fedloop.loop import RunFailed


def lin(tmp_path, **kw):
    base = dict(task="linear", rounds=4, clients=4, rank=4, keep=1, lr=0.02, out=str(tmp_path / "run"),
                linear={"dim": 16, "samples": 64, "test_samples": 256})
    base.update(kw)
    return RunConfig(**base)


def assert_resume_matches(tmp_path, full, kw):
    """A run of 3 rounds in ``tmp_path/b`` resumed to 6 writes the ledger of ``full`` (6 rounds
    in one go), solve times aside."""
    run(lin(tmp_path, rounds=3, out=str(tmp_path / "b"), **kw), progress=False)
    resumed = run(lin(tmp_path, rounds=6, out=str(tmp_path / "b"), **kw), resume=True, progress=False)
    strip = lambda h: History.from_dict(h.to_dict()).to_dict()  # noqa: E731
    a_rows, b_rows = strip(full), strip(resumed)
    for rows in (a_rows, b_rows):
        for r in rows["rounds"]:
            r.pop("solve_time_s")
    assert b_rows["rounds"] == a_rows["rounds"] and b_rows["clients"] == a_rows["clients"]


def test_topk_ledger_bits_are_its_encoded_bytes(tmp_path):
    from soft.baselines import topk_budget

    cfg = lin(tmp_path, strategy="topk", rounds=2, keep=2)
    h = run(cfg, progress=False)
    r = Server(cfg)
    _, bits, _ = topk_budget(r.global_factors, 2)
    for row in h.clients:
        assert row["uplink_bits"] == bits + r.head_bits  # 8·len(TopKUpdate.encode()), within SOFT's budget
        assert bits <= r.soft_shape.payload_bits(2)


@pytest.mark.parametrize("strategy", ["tsfa", "fixed", "random", "fedit", "ideal"])
def test_ledger_bits_are_the_encoded_bytes(tmp_path, strategy):
    cfg = lin(tmp_path, strategy=strategy, rounds=2)
    h = run(cfg, progress=False)
    r = Server(cfg)  # the same shapes
    for row in h.clients:
        if row["status"] == "ok":
            # header + masks + values of the SOFT payload, plus the dense head (none for linear)
            assert row["uplink_bits"] == r.soft_shape.payload_bits(row["keep"]) + r.head_bits
            assert row["uplink_bits"] % 8 == 0
        else:
            assert row["uplink_bits"] == 0
    per_round = {}
    for row in h.clients:
        per_round[row["round"]] = per_round.get(row["round"], 0) + row["uplink_bits"]
    assert [per_round[i + 1] for i in range(2)] == [row["uplink_bits"] for row in h.rounds]


def test_fedit_reproduces_fedavg_of_factors(tmp_path):
    cfg = lin(tmp_path, strategy="fedit", rounds=1, reorthogonalize=False)
    r = Server(cfg)
    pool = LocalPool(r)
    start = soft.clone_factors(r.global_factors)
    locals_ = []
    for k in range(cfg.clients):
        r.global_factors = soft.clone_factors(start)
        locals_.append(pool.train_one(0, k)[0])
    r.global_factors = soft.clone_factors(start)
    r.step(pool)
    p = r.weights / r.weights.sum()
    for name in start:
        for i in range(2):
            avg = sum(pk * f[name][i].double() for pk, f in zip(p, locals_, strict=True))
            torch.testing.assert_close(r.global_factors[name][i].double(), avg, rtol=1e-6, atol=1e-7)


def checkpoint_of(folder):
    """A run folder's verified checkpoint: its state with the global factors as {module: (A, B)}."""
    tensors, state = load_checkpoint(folder)
    names = sorted({k.split("/")[1] for k in tensors if k.startswith("global/")})
    return {**state, "global_factors": {n: (tensors[f"global/{n}/A"], tensors[f"global/{n}/B"]) for n in names}}


def test_resume_is_bit_identical(tmp_path):
    full = run(lin(tmp_path, strategy="tsfa", rounds=6, checkpoint_every=3, out=str(tmp_path / "a")), progress=False)
    run(lin(tmp_path, strategy="tsfa", rounds=3, checkpoint_every=3, out=str(tmp_path / "b")), progress=False)
    resumed = run(lin(tmp_path, strategy="tsfa", rounds=6, checkpoint_every=3, out=str(tmp_path / "b")),
                  resume=True, progress=False)
    strip = lambda h: History.from_dict(h.to_dict()).to_dict()  # NaN-safe comparison  # noqa: E731
    a_rows, b_rows = strip(full), strip(resumed)
    for rows in (a_rows, b_rows):
        for r in rows["rounds"]:
            r.pop("solve_time_s")
    assert b_rows["rounds"] == a_rows["rounds"]
    assert b_rows["clients"] == a_rows["clients"]
    a, b = checkpoint_of(tmp_path / "a")["global_factors"], checkpoint_of(tmp_path / "b")["global_factors"]
    for name in a:
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1])
    loaded = History.load(tmp_path / "b")
    assert len(loaded.rounds) == 6 and loaded.config["strategy"] == "tsfa"


def test_resume_rejects_a_different_config(tmp_path):
    run(lin(tmp_path, rounds=2, checkpoint_every=1), progress=False)
    with pytest.raises(ValueError, match="different config"):
        run(lin(tmp_path, rounds=3, lr=0.5), resume=True, progress=False)


def test_faulty_client_is_dropped_and_recorded(tmp_path):
    def hook(rnd, k):
        if rnd == 2 and k == 1:
            raise RuntimeError("radio link lost")

    h = run(lin(tmp_path, strategy="fixed", rounds=3), progress=False, client_hook=hook)
    bad = [c for c in h.clients if c["round"] == 2 and c["client"] == 1][0]
    assert bad["status"].startswith("error: RuntimeError: radio link lost") and bad["uplink_bits"] == 0
    assert h.rounds[1]["scheduled"] == 3 and h.rounds[1]["dropped"] == 1
    assert h.rounds[2]["scheduled"] == 4 and len(h.rounds) == 3


def test_deadline_misses_are_dropped(tmp_path):
    h = run(lin(tmp_path, strategy="fedit", rounds=2, deadline_factor=1.0, budget_factor=0.3), progress=False)
    statuses = {c["status"] for c in h.clients}
    assert "deadline" in statuses
    for row in h.rounds:
        assert row["latency_s"] == pytest.approx(0.3 * h.meta["dense_median_latency_s"])


def test_nan_loss_stops_with_checkpoint_intact(tmp_path):
    cfg = lin(tmp_path, strategy="fedit", rounds=2, checkpoint_every=1)
    run(cfg, progress=False)
    ckpt = tmp_path / "run" / CHECKPOINT
    before = ckpt.read_bytes()
    with pytest.raises(RunFailed, match="non-finite loss at round 1|non-finite loss .* at round 1"):
        run(cfg.replace(rounds=6, optimizer="sgd", lr=1e30), progress=False)
    # the failing run never completed a round, so the good run's checkpoint is untouched
    assert ckpt.read_bytes() == before
    assert checkpoint_of(tmp_path / "run")["round"] == 2


def test_memory_is_adapters_not_models(tmp_path):
    small, big = Server(lin(tmp_path, clients=2)), Server(lin(tmp_path, clients=12))
    n_model = sum(p.numel() for p in small.task.model.parameters())
    assert sum(p.numel() for p in big.task.model.parameters()) == n_model  # one shared model
    assert big.history.meta["lora_parameters"] < n_model


def test_config_validation_and_toml(tmp_path):
    with pytest.raises(ValueError, match="strategy must be one of"):
        RunConfig(strategy="magic")
    with pytest.raises(ValueError, match="keep must be an integer in 1..rank"):
        RunConfig(rank=4, keep=5)
    with pytest.raises(ValueError, match="unknown config keys"):
        RunConfig.from_dict({"rounds": 3, "colour": "blue"})
    p = tmp_path / "c.toml"
    p.write_text('task = "linear"\nstrategy = "fedit"\nrounds = 3\n[linear]\ndim = 8\n')
    cfg = RunConfig.from_toml(p)
    assert cfg.rounds == 3 and cfg.linear == {"dim": 8}
    p.write_text("rounds = [")
    with pytest.raises(ValueError, match="not valid TOML"):
        RunConfig.from_toml(p)


def test_linear_strategies_learn(tmp_path):
    h = run(lin(tmp_path, strategy="fedit", rounds=8), progress=False)
    loss = h.column("test_loss")
    assert loss[-1] < 0.5 * loss[0]
    assert math.isnan(h.final_accuracy)
    assert np.all(h.column("uplink_bits") > 0)


@pytest.mark.slow
def test_rt_minilm_smoke(tmp_path):
    cfg = RunConfig(task="rt-minilm", strategy="tsfa", rounds=2, clients=3, local_steps=1, batch_size=8,
                    test_size=64, out=str(tmp_path / "rt"))
    h = run(cfg, progress=False)
    assert len(h.rounds) == 2 and 0.0 <= h.final_accuracy <= 1.0
    assert h.meta["head_bits"] == 32 * 770
    for c in h.clients:
        if c["status"] == "ok":
            assert c["uplink_bits"] % 8 == 0 and c["uplink_bits"] > h.meta["head_bits"]


def test_tsfa_tracks_the_latency_budget_and_saves_bits(tmp_path):
    cfg = lin(tmp_path, strategy="tsfa", rounds=30, clients=6, relative_v=1.0)
    h = run(cfg, progress=False)
    lat = h.column("latency_s")
    assert lat.mean() <= 1.1 * h.meta["latency_budget_s"]
    dense = run(cfg.replace(strategy="fedit", out=str(tmp_path / "dense")), progress=False)
    assert h.total_uplink_bits < 0.9 * dense.total_uplink_bits
    assert dense.column("latency_s").mean() > 1.5 * h.meta["latency_budget_s"]  # dense does not fit τ̄


def test_cli_plot_and_compare(tmp_path, capsys):
    from tsfa.cli import main

    a = run(lin(tmp_path, strategy="tsfa", rounds=3, out=str(tmp_path / "a")), progress=False)
    run(lin(tmp_path, strategy="fedit", rounds=3, out=str(tmp_path / "b")), progress=False)
    assert main(["plot", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "run.png").stat().st_size > 10_000
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "tsfa" in out and "fedit" in out and (tmp_path / "c" / "compare.png").is_file()
    assert f"{a.total_uplink_bits / 1e6:.2f}" in out
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no history.json" in capsys.readouterr().err


def test_ideal_aggregates_the_exact_average_of_products_and_is_not_worse_than_fedit_under_sgd(tmp_path):
    """``ideal`` folds Σ p_k B_k A_k − B̄Ā into the frozen weights, so the new global product is the
    data-weighted average of the clients' products (product_error ≈ 0 every round). On the
    exact-constant task (plain SGD) it then ends no worse than fedit; with AdamW it can end worse,
    because Adam's sign-like steps make each client's ΔB_k ΔA_k large and the exact average keeps
    that second-order noise, which averaging the factors first shrinks (docs/results.md)."""
    finals = {}
    for strategy in ("fedit", "ideal"):
        for seed in (0, 3):
            cfg = lin(tmp_path, strategy=strategy, seed=seed, rounds=15, clients=6, rank=4, lr=0.05,
                      optimizer="sgd", momentum=0.0, local_steps=4, out=str(tmp_path / f"{strategy}{seed}"))
            h = run(cfg, progress=False)
            finals[(strategy, seed)] = h.rounds[-1]["test_loss"]
            pe = h.column("product_error")
            if strategy == "ideal":
                ref = np.nanmax(h.column("update_energy"))
                assert np.nanmax(pe) <= 1e-10 * max(ref, 1e-12)
            else:
                assert np.nanmax(pe) > 0  # separate averaging loses the covariance term
    for seed in (0, 3):
        assert finals[("ideal", seed)] <= finals[("fedit", seed)] * (1 + 1e-6)


def test_the_ledger_writes_only_declared_columns(tmp_path):
    from convergence.calibration import MEASUREMENTS
    from fedloop.measure import CLIENT_COLUMNS, ROUND_COLUMNS

    assert set(MEASUREMENTS) <= set(ROUND_COLUMNS)  # one schema: the bound reads what the loop writes
    for strategy in ("tsfa", "ffa"):
        h = run(lin(tmp_path, strategy=strategy, rounds=2, out=str(tmp_path / strategy)), progress=False)
        assert {k for row in h.rounds for k in row} <= set(ROUND_COLUMNS)
        assert {k for row in h.clients for k in row} == set(CLIENT_COLUMNS)
        assert "covariance_sq" in h.rounds[0] and "dropped_energy" in h.rounds[0]
    with pytest.raises(KeyError, match="unknown ledger column 'covariance'"):
        h.column("covariance")


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_value_precision_ledger_bits_are_the_encoded_bytes(tmp_path, bits):
    cfg = lin(tmp_path, strategy="tsfa", rounds=2, value_bits=bits)
    h = run(cfg, progress=False)
    r = Server(cfg)
    shape = tsfa_shape(r, bits)
    sent = [row for row in h.clients if row["status"] == "ok"]
    assert sent
    for row in sent:
        assert row["uplink_bits"] == shape.payload_bits(row["keep"]) + r.head_bits
    assert r.shape.bits_per_value == bits  # the allocator prices the same payload


def tsfa_shape(server, bits):
    from tsfa import LoraShape

    s = server.soft_shape
    return LoraShape(s.modules, s.rank, bits, s.header_bits)


@pytest.mark.parametrize("mode", ["rotated", "fixed"])
def test_error_feedback_resume_is_bit_identical(tmp_path, mode):
    kw = dict(strategy="tsfa", checkpoint_every=3, error_feedback=mode, value_bits=8)
    full = run(lin(tmp_path, rounds=6, out=str(tmp_path / "a"), **kw), progress=False)
    assert_resume_matches(tmp_path, full, kw)
    ta, _ = load_checkpoint(tmp_path / "a")
    tb, _ = load_checkpoint(tmp_path / "b")
    assert set(ta) == set(tb) and any(k.startswith("residual/") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_error_feedback_keeps_what_a_client_did_not_send(tmp_path):
    """After a round, every client's residual is its effective local factors minus what the
    server applied from its payload (the whole update when it sent nothing)."""
    from fedloop.client import applied

    cfg = lin(tmp_path, strategy="fixed", rounds=1, keep=1, error_feedback="fixed", reorthogonalize=False)
    server = Server(cfg)
    pool = LocalPool(server)
    glob = soft.clone_factors(server.global_factors)
    server.step(pool)
    for k in range(cfg.clients):
        eff = pool.local_factors[k]
        payload, _ = server.strategy.encode(cfg, glob, eff, 1, 0, k)
        server_now = server.global_factors
        server.global_factors = glob
        sent = applied(server, payload, 1)
        server.global_factors = server_now
        for n, (eA, eB) in server.residuals[k].items():
            assert torch.allclose(eA, eff[n][0] - sent[n][0]) and torch.allclose(eB, eff[n][1] - sent[n][1])
            # keep 1 of 4 components: the residual holds the other three, so it is not zero
            assert float(eA.norm()) > 0


def test_error_feedback_and_precision_settings_are_validated(tmp_path):
    with pytest.raises(ValueError, match="value_bits"):
        lin(tmp_path, value_bits=12)
    with pytest.raises(ValueError, match="value_bits"):
        lin(tmp_path, strategy="topk", value_bits=8)
    with pytest.raises(ValueError, match="value_bits"):
        lin(tmp_path, strategy="svd", value_bits=16)
    with pytest.raises(ValueError, match="error_feedback"):
        lin(tmp_path, error_feedback="yes")
    with pytest.raises(ValueError, match="error_feedback"):
        lin(tmp_path, strategy="head", error_feedback="rotated")


def test_auto_precision_sends_what_the_allocator_chose_and_resumes_bit_identically(tmp_path):
    """value_bits = 'auto': each client's payload is its allocated (keep, q), byte for byte; the
    ledger records q; more than one precision is used; resume with error feedback is bit-identical."""
    kw = dict(strategy="tsfa", checkpoint_every=3, error_feedback="rotated", value_bits="auto", optimizer="sgd",
              momentum=0.0, lr=0.05, local_steps=3, clients=6)
    full = run(lin(tmp_path, rounds=6, out=str(tmp_path / "a"), **kw), progress=False)
    server = Server(lin(tmp_path, rounds=6, **kw))
    sent = [row for row in full.clients if row["status"] == "ok"]
    assert sent and len({row["value_bits"] for row in sent}) > 1
    for row in sent:
        assert row["uplink_bits"] == tsfa_shape(server, row["value_bits"]).payload_bits(row["keep"]) + server.head_bits
    for r in full.rounds:
        qs = [c["value_bits"] for c in full.clients if c["round"] == r["round"] and c["status"] == "ok"]
        assert r["mean_value_bits"] == pytest.approx(np.mean(qs))
    assert_resume_matches(tmp_path, full, kw)


def test_auto_precision_rejects_a_payload_at_another_precision(tmp_path):
    """A client that uploads at a precision other than its allocation is rejected, named."""
    cfg = lin(tmp_path, strategy="tsfa", rounds=1, value_bits="auto", clients=4)
    server = Server(cfg)

    class Liar(LocalPool):
        def upload(self, t, sent, keep, bandwidth_hz, value_bits=None):
            other = {k: 32 if q != 32 else 16 for k, q in value_bits.items()}
            return super().upload(t, sent, keep, bandwidth_hz, other)

    server.step(Liar(server))
    status = [c["status"] for c in server.history.clients]
    assert status and all(s.startswith("rejected: the payload has") or s == "skipped" for s in status)
    assert any(s.startswith("rejected") for s in status)


def test_auto_precision_is_validated(tmp_path):
    with pytest.raises(ValueError, match="value_bits"):
        lin(tmp_path, strategy="fixed", value_bits="auto")
    with pytest.raises(ValueError, match="value_bits"):
        lin(tmp_path, strategy="tsfa", scope="global", value_bits="auto")
    server = Server(lin(tmp_path, strategy="tsfa", value_bits="auto"))
    report = LocalPool(server).train(0)
    with pytest.raises(ValueError, match="rounding"):
        server.check_report(report._replace(rounding=None))
    with pytest.raises(ValueError, match="rounding"):
        server.check_report(report._replace(rounding=-report.rounding - 1))


def test_flasc_broadcasts_the_largest_changes_and_keeps_the_rest(tmp_path):
    """flasc: round 1 receives the whole adapter, later rounds 8 × the bytes of a top-k payload at the
    uplink's budget; the clients' view moves by exactly that payload, and what is not sent stays
    in (global − view)."""
    from soft.baselines import decode_topk, topk_elementwise

    cfg = lin(tmp_path, strategy="flasc", rounds=2, clients=4, optimizer="sgd", momentum=0.0, lr=0.05)
    server = Server(cfg)
    pool = LocalPool(server)
    dense, view0 = server.broadcast_bits, soft.clone_factors(server.view)
    server.step(pool)
    glob1, view1 = soft.clone_factors(server.global_factors), soft.clone_factors(server.view)
    data = topk_elementwise(view0, glob1, cfg.keep).encode()
    inc = decode_topk(data, server.soft_shape)
    for (n, (A, B)), da, db in zip(view0.items(), inc.delta_a, inc.delta_b, strict=True):
        assert torch.equal(view1[n][0], A + da) and torch.equal(view1[n][1], B + db)
    pending = sum(int(((glob1[n][f] - view1[n][f]) != 0).sum()) for n in glob1 for f in (0, 1))
    assert pending > 0  # something is still waiting to be sent
    server.step(pool)  # trains from view1
    assert server.history.rounds[0]["downlink_bits"] == cfg.clients * dense
    assert server.history.rounds[1]["downlink_bits"] == cfg.clients * 8 * len(data)
    assert 8 * len(data) == server.history.clients[-1]["uplink_bits"] < dense  # the same budget both ways


def test_flasc_resume_is_bit_identical(tmp_path):
    kw = dict(strategy="flasc", checkpoint_every=3, error_feedback="fixed")
    full = run(lin(tmp_path, rounds=6, out=str(tmp_path / "a"), **kw), progress=False)
    assert_resume_matches(tmp_path, full, kw)
    ta, _ = load_checkpoint(tmp_path / "a")
    assert any(k.startswith("view/") for k in ta)


@pytest.mark.parametrize("q", [32, 16, 8, 4])
def test_delta_broadcast_sends_the_change_at_its_precision(tmp_path, q):
    """downlink_value_bits q: round 1 receives the whole adapter; afterwards the clients' view moves
    by exactly SOFT's payload of (global − view) at q bits, whose 8 × bytes are payload_bits(r) at
    q and are what the ledger counts; at 32 bits the view catches up with the global adapter, at
    lower precision the rounding waits in (global − view) and is sent later."""
    from fedloop.strategies import derive_seed, read_wire, wire_bytes

    cfg = lin(tmp_path, strategy="tsfa", rounds=3, downlink_value_bits=q)
    server = Server(cfg)
    pool = LocalPool(server)
    r, dense, view0 = server.soft_shape.rank, server.broadcast_bits, soft.clone_factors(server.view)
    server.step(pool)
    glob1, view1 = soft.clone_factors(server.global_factors), soft.clone_factors(server.view)
    data = wire_bytes(view0, glob1, r, q, rounding_seed=derive_seed(cfg.seed, 44, 0))
    assert 8 * len(data) == dataclasses.replace(server.soft_shape, bits_per_value=q).payload_bits(r)
    expect = read_wire(data, server.soft_shape).apply_to(view0)
    change = math.sqrt(sum(float(((glob1[n][f] - view0[n][f]) ** 2).sum()) for n in glob1 for f in (0, 1)))
    pending = math.sqrt(sum(float(((glob1[n][f] - view1[n][f]) ** 2).sum()) for n in glob1 for f in (0, 1)))
    for n in glob1:
        assert torch.equal(view1[n][0], expect[n][0]) and torch.equal(view1[n][1], expect[n][1])
    if q == 32:
        assert pending <= 1e-6 * change
    else:
        assert 0 < pending < (0.02 if q == 16 else 0.5) * change
    server.step(pool)  # trains from view1
    assert server.history.rounds[0]["downlink_bits"] == cfg.clients * dense
    assert server.history.rounds[1]["downlink_bits"] == cfg.clients * (8 * len(data) + server.head_bits)
    assert all(c["downlink_bits"] == 8 * len(data) + server.head_bits for c in server.history.clients
               if c["round"] == 2)


def test_delta_broadcast_keeps_the_components_that_changed_most(tmp_path):
    cfg = lin(tmp_path, strategy="fixed", rounds=1, rank=4, keep=2, downlink_value_bits=32, downlink_keep=1)
    server = Server(cfg)
    view0 = soft.clone_factors(server.view)
    server.step(LocalPool(server))
    for n, (A, B) in server.global_factors.items():
        dA, dB = A - view0[n][0], B - view0[n][1]
        moved = [i for i in range(4) if not torch.equal(server.view[n][0][i], view0[n][0][i])]
        energy = (dA ** 2).sum(1) * (dB ** 2).sum(0)  # SOFT's importance of component i: ‖ΔB_i‖²‖ΔA_i‖²
        assert len(moved) == 1 and moved[0] == int(torch.argmax(energy)), (n, moved, energy)


def test_delta_broadcast_resume_is_bit_identical(tmp_path):
    kw = dict(strategy="tsfa", checkpoint_every=3, downlink_value_bits=4, error_feedback="rotated")
    full = run(lin(tmp_path, rounds=6, out=str(tmp_path / "a"), **kw), progress=False)
    assert_resume_matches(tmp_path, full, kw)
    assert len({r["downlink_bits"] for r in full.rounds}) == 2  # the whole adapter, then 4-bit deltas


@pytest.mark.parametrize("kw, match", [
    (dict(downlink_value_bits=7), "downlink_value_bits must be None"),
    (dict(downlink_value_bits=True), "downlink_value_bits must be None"),
    (dict(strategy="ideal", downlink_value_bits=8), "downlink_value_bits applies to"),
    (dict(strategy="flasc", downlink_value_bits=8), "downlink_value_bits applies to"),
    (dict(downlink_keep=2), "downlink_keep must be"),
    (dict(downlink_value_bits=8, downlink_keep=5), "downlink_keep must be"),
    (dict(downlink_value_bits=8, downlink_keep=0), "downlink_keep must be"),
])
def test_delta_broadcast_settings_are_checked(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        lin(tmp_path, **kw)
