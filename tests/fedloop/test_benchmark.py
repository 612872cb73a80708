"""The comparison protocol (fedloop.benchmark): pairing, bits-to-target, "not reached", reuse."""

import json
import math

import numpy as np
import pytest

from fedloop import History, RunConfig, Server
from fedloop.benchmark import METRICS, Metric, benchmark, first_reach, mean_ci, metric_within, summarise
from fedloop.tasks import make_task


def lin(tmp_path, **kw):
    base = dict(task="linear", rounds=3, clients=4, rank=4, keep=1, lr=0.02, out=str(tmp_path / "run"),
                linear={"dim": 12, "samples": 48, "test_samples": 128})
    base.update(kw)
    return RunConfig(**base)


def hand_history(metric_values, bits_per_round, seconds_per_round, key="accuracy", initial=0.5):
    rounds = [{"round": t + 1, key: v, "uplink_bits": b, "downlink_bits": 10, "latency_s": s,
               "wallclock_s": float(np.sum(seconds_per_round[:t + 1]))}
              for t, (v, b, s) in enumerate(zip(metric_values, bits_per_round, seconds_per_round, strict=True))]
    return History(config={}, rounds=rounds, meta={"latency_budget_s": 1.0, f"initial_{key}": initial})


def test_bits_to_target_on_a_hand_made_history():
    acc = Metric("accuracy", True, 0.01)
    h = hand_history([0.60, 0.70, 0.69, 0.74, 0.80], [100, 100, 50, 50, 50], [1.0, 2.0, 1.0, 1.0, 1.0])
    hit = first_reach(h, acc, acc.target(0.75))  # target 0.74: first reached at round 4 (0.74 >= 0.74)
    assert hit == {"round": 4, "uplink_bits": 300.0, "wallclock_s": 5.0, "downlink_bits": 40.0}
    assert first_reach(h, acc, 0.71)["round"] == 4  # round 3 (0.69) does not count, round 2 (0.70) does not reach
    assert first_reach(h, acc, 0.90) == {"round": None, "uplink_bits": None, "wallclock_s": None,
                                         "downlink_bits": None}
    # metric after the last round within a budget; the initial metric when none fits
    assert metric_within(h, acc, "uplink_bits", 250) == 0.69
    assert metric_within(h, acc, "uplink_bits", 99) == 0.5
    assert metric_within(h, acc, "wallclock_s", 3.0) == 0.70
    loss = Metric("test_loss", False, 0.01, relative=True)
    hl = hand_history([1.0, 0.5, 0.2], [8, 8, 8], [1, 1, 1], key="test_loss", initial=2.0)
    assert loss.target(0.2) == pytest.approx(0.202)
    assert first_reach(hl, loss, 0.202)["uplink_bits"] == 24.0
    assert first_reach(hl, loss, 0.6)["round"] == 2


def test_summary_reports_not_reached_and_paired_differences():
    acc = METRICS["rt-minilm"]
    runs = {}
    for k, shift in enumerate((0.0, 0.02, -0.01)):
        runs[("fedit", k)] = hand_history([0.6 + shift, 0.75 + shift], [100, 100], [1, 1])
        runs[("ideal", k)] = hand_history([0.6 + shift, 0.73 + shift], [100, 100], [2, 2])
        runs[("cheap", k)] = hand_history([0.7 + shift, 0.76 + shift], [10, 10], [1, 1])
        runs[("head", k)] = hand_history([0.55, 0.56], [1, 1], [1, 1])
    res = summarise(runs, acc, ("fedit", "ideal", "cheap", "head"), (0, 1, 2))
    assert res["reference"] == "fedit"  # the better of ideal and fedit
    assert res["target"] == pytest.approx(np.mean([0.75, 0.77, 0.74]) - 0.01)
    rows = {r["strategy"]: r for r in res["summary"]}
    assert rows["cheap"]["reached"] == 3 and rows["cheap"]["bits_to_target_mean"] == 20.0
    assert rows["fedit"]["bits_to_target_mean"] == 200.0 and rows["fedit"]["time_to_target_mean"] == 2.0
    assert rows["head"]["reached"] == 0 and math.isnan(rows["head"]["bits_to_target_mean"])
    assert rows["ideal"]["paired_difference_mean"] == pytest.approx(-0.02)
    assert rows["ideal"]["paired_difference_ci"] == pytest.approx(0.0, abs=1e-12)  # the same gap on every seed
    assert res["equal_bits"] == 20.0  # the cheapest sender's total; head (1 bit a round) sends no adapter
    assert rows["fedit"]["at_equal_bits_mean"] == pytest.approx(0.5)  # no fedit round fits in 20 bits
    mean, half = mean_ci([0.6, 0.62, 0.59])
    assert mean == pytest.approx(0.6033333) and half > 0


def test_paired_seeds_share_splits_and_channels(tmp_path):
    strategies = ("fedit", "lowrank", "head", "tsfa", "topk")
    b = benchmark(lin(tmp_path), strategies, seeds=2, out=tmp_path / "bench", progress=False)
    for k in (0, 1):
        snr = {s: [(c["round"], c["client"], c["snr_hz"], c["compute_s"]) for c in b.runs[(s, k)].clients]
               for s in strategies}
        assert all(snr[s] == snr["fedit"] for s in strategies)
        tasks = {s: make_task(lin(tmp_path, strategy=s, seed=k)) for s in strategies}
        for s in strategies:  # identical client data and test sets across strategies
            for x, y in zip(tasks[s].xs, tasks["fedit"].xs, strict=True):
                assert np.array_equal(x.numpy(), y.numpy())
            assert np.array_equal(tasks[s].x_test.numpy(), tasks["fedit"].x_test.numpy())
        assert Server(lin(tmp_path, strategy="head", seed=k)).tau_bar == Server(lin(tmp_path, seed=k)).tau_bar
    assert b.runs[("fedit", 0)].clients[0]["snr_hz"] != b.runs[("fedit", 1)].clients[0]["snr_hz"]
    rows = {r["strategy"]: r for r in b.summary}
    # lowrank is dense fedit at rank keep = 1: a quarter of fedit's payload values per round
    assert rows["lowrank"]["uplink_bits_mean"] < 0.3 * rows["fedit"]["uplink_bits_mean"]
    assert rows["head"]["uplink_bits_mean"] == 0  # linear has no head: the frozen adapter sends nothing
    assert rows["head"]["final_mean"] == pytest.approx(b.runs[("head", 0)].meta["initial_test_loss"] / 2
                                                       + b.runs[("head", 1)].meta["initial_test_loss"] / 2)
    for name in ("summary.csv", "summary.json", "rounds.csv", "benchmark.png"):
        assert (tmp_path / "bench" / name).is_file()
    saved = json.loads((tmp_path / "bench" / "summary.json").read_text())
    assert saved["reference"] in ("fedit",) and len(saved["summary"]) == len(strategies)
    assert "not reached" in b.format_table() or all(r["reached"] for r in b.summary)
    # finished runs are reused: a second call loads the same histories without training
    again = benchmark(lin(tmp_path), strategies, seeds=2, out=tmp_path / "bench", progress=False)
    assert again.summary == b.summary
    # a ledger written before a setting existed ran with its default: still reused (not re-run)
    path = tmp_path / "bench" / "fedit" / "seed0" / "history.json"
    old = json.loads(path.read_text())
    del old["config"]["downlink_value_bits"], old["config"]["downlink_keep"]
    path.write_text(json.dumps(old))
    benchmark(lin(tmp_path), ("fedit",), seeds=1, out=tmp_path / "bench", progress=False)
    assert "downlink_keep" not in json.loads(path.read_text())["config"]


def test_benchmark_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="strategies"):
        benchmark(lin(tmp_path), ("fedit", "nope"), seeds=2, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="seeds"):
        benchmark(lin(tmp_path), ("fedit",), seeds=0, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="delta"):
        benchmark(lin(tmp_path), ("fedit",), seeds=1, delta=-1.0, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="variants"):
        benchmark(lin(tmp_path), ("fedit",), seeds=1, out=tmp_path, progress=False, variants={"fedit": {}})
    with pytest.raises(ValueError, match="error_feedback"):  # checked before any run
        benchmark(lin(tmp_path), ("x",), seeds=1, out=tmp_path, progress=False,
                  variants={"x": {"strategy": "fixed", "error_feedback": "maybe"}})
