"""Every example runs headless in a shortened form and writes its figure and numbers."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from fedloop import RunConfig

ROOT = Path(__file__).resolve().parents[2]


def load(name):
    spec = importlib.util.spec_from_file_location(name.replace(".py", ""), ROOT / "examples" / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_strategy_comparison_short(tmp_path):
    ex = load("04_strategy_comparison.py")
    base = RunConfig(task="linear", rounds=3, clients=3, rank=4, keep=1, lr=0.02, checkpoint_every=3,
                     linear={"dim": 16, "samples": 48, "test_samples": 128})
    table = ex.compare(["fedit", "tsfa"], [0, 1], base, tmp_path, log=lambda *_: None)
    assert set(table) == {"fedit", "tsfa"} and table["tsfa"]["runs"] == 2
    assert table["tsfa"]["uplink_mbit"] <= table["fedit"]["uplink_mbit"]
    rows = list(csv.DictReader(open(tmp_path / "comparison.csv")))
    assert len(rows) == 4
    assert (tmp_path / "comparison.png").stat().st_size > 10_000


def test_bound_vs_empirical_short(tmp_path):
    import json

    ex = load("06_bound_vs_empirical.py")
    assert ex.main(["--quick", "--tasks", "linear", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "bound_spearman.json").read_text())
    assert summary["linear"]["exact_bound_holds_every_round"] is True
    assert summary["linear"]["tightness_median"] >= 1.0
    rows = list(csv.DictReader(open(tmp_path / "bound_vs_empirical.csv")))
    assert len(rows) == 4 and all(float(r["predicted_final"]) > 0 for r in rows)
    assert (tmp_path / "bound_linear.png").stat().st_size > 20_000


def test_bound_vs_empirical_rt_minilm_short(tmp_path):
    import json

    import pytest

    from fedloop.data import TaskUnavailable, load_rotten_tomatoes

    try:
        load_rotten_tomatoes()
    except TaskUnavailable as exc:
        pytest.skip(str(exc))
    ex = load("06_bound_vs_empirical.py")
    assert ex.main(["--quick", "--tasks", "rt-minilm", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "bound_spearman.json").read_text())
    assert -1.0 <= summary["rt-minilm"]["spearman_predicted_vs_empirical"] <= 1.0
    assert (tmp_path / "bound_rt_minilm.png").stat().st_size > 20_000


def test_predictions_short(tmp_path):
    """Example 09 on a tiny linear grid with the offline check: every held-out cell predicted with a
    band, Spearman and coverage reported, the exact bound checked, the plan against tsfa per rank."""
    ex = load("09_predictions.py")
    assert ex.main(["--quick", "--task", "linear", "--seeds", "2", "--offline", "--runs", str(tmp_path / "runs"),
                    "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "predictions_linear.json").read_text())
    assert summary["held_out_cells"] == 3 and summary["exact_bound_holds_every_run_every_round"] is True
    assert 0.0 <= summary["coverage_pooled"] <= 1.0 and -1.0 <= summary["spearman_final"] <= 1.0
    off = summary["offline"]
    assert off["plan_rank"] in (1, 2, 4) and len(off["best_two_ranks"]) == 2
    # the runs and the plan's simulated stage start from the same queue rule; latency reported per rank
    assert off["initial_queue"] == "auto" and set(off["measured_latency_over_budget_by_rank"]) == {"1", "2", "4"}
    assert all(0 < x < 10 for x in off["measured_latency_over_budget_by_rank"].values())
    assert (tmp_path / "runs" / "linear" / "tsfa-q0auto_r4_k2_s10" / "history.json").is_file()
    # the offline check alone, on the stored runs: the same plan
    assert ex.main(["--quick", "--task", "linear", "--seeds", "2", "--offline-only", "--runs", str(tmp_path / "runs"),
                    "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "offline_check_linear.json").read_text())
    assert (again["plan_rank"], again["plan_relative_v"]) == (off["plan_rank"], off["plan_relative_v"])
    rows = list(csv.DictReader(open(tmp_path / "predictions_linear.csv")))
    assert len(rows) == 6 and all(float(r["band_low_final"]) <= float(r["predicted_final"])
                                  <= float(r["band_high_final"]) for r in rows)
    assert (tmp_path / "predictions_linear.png").stat().st_size > 20_000


def test_offline_rank_design_short(tmp_path):
    import json

    ex = load("01_offline_rank_design.py")
    assert ex.main(["--quick", "--tasks", "linear", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "offline_summary.json").read_text())["linear"]
    assert summary["status"] == "optimal" and summary["chosen_rank"] in (1, 2, 3)
    sweep = list(csv.DictReader(open(tmp_path / "offline_sweep.csv")))
    assert [int(r["rank"]) for r in sweep] == [1, 2, 3]
    assert (tmp_path / "offline_linear.png").stat().st_size > 20_000


def test_soft_vs_naive_short(tmp_path):
    ex = load("03_soft_vs_naive.py")
    assert ex.main(["--keep", "1", "--seeds", "0", "--rounds", "3", "--clients", "3", "--out", str(tmp_path)]) == 0
    rows = {r["strategy"]: r for r in csv.DictReader(open(tmp_path / "soft_vs_naive.csv"))}
    assert set(rows) == {"fixed", "random", "topk", "svd", "fedit"}
    # equal bits for SOFT, random and SVD (same wire format); dense sends more; dense loses nothing
    assert rows["fixed"]["uplink_mbit"] == rows["random"]["uplink_mbit"]
    assert float(rows["fedit"]["uplink_mbit"]) > float(rows["fixed"]["uplink_mbit"])
    assert float(rows["fedit"]["relative_product_error"]) < 1e-9
    assert (tmp_path / "soft_vs_naive.png").stat().st_size > 20_000


def test_latency_budget_short(tmp_path):
    ex = load("05_latency_budget.py")
    assert ex.main(["--factors", "0.5", "--rounds", "8", "--clients", "4", "--out", str(tmp_path)]) == 0
    rows = {r["strategy"]: r for r in csv.DictReader(open(tmp_path / "latency_budget.csv"))}
    ratio = {k: float(v["mean_latency_over_dense_median"]) for k, v in rows.items()}
    assert ratio["tsfa"] < ratio["fedit"]
    assert (tmp_path / "latency_budget.png").stat().st_size > 20_000


def test_testbed_short(tmp_path):
    ex = load("08_testbed.py")
    rows = ex.main(["--candidates", "rt-distill", "--seeds", "2", "--rounds", "2", "--runs", str(tmp_path / "runs"),
                    "--out", str(tmp_path)])
    row = rows[0]
    assert row["candidate"] == "rt-distill" and row["metric"] == "test_loss"
    assert row["head_final"] == pytest.approx(1.0, abs=1e-5) and row["head_sd"] == pytest.approx(0.0, abs=1e-6)
    assert row["ideal_final"] < 0.99  # two rounds of dense LoRA already move towards the teacher
    assert isinstance(row["adapter_carries"], bool) and isinstance(row["rank_matters"], bool)
    saved = json.loads((tmp_path / "testbed.json").read_text())
    assert saved[0]["r2_final"] == row["r2_final"] and (tmp_path / "testbed.csv").is_file()


def test_communication_short(tmp_path):
    """Example 10 on a tiny linear task: variants with error feedback and 8-bit values run under
    the protocol; the 8-bit variant sends fewer bits; the paired comparisons are reported."""
    ex = load("10_communication.py")
    assert ex.main(["--quick", "--seeds", "2", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "communication_linear.json").read_text())
    rows = {r["strategy"]: r for r in s["rows"]}
    assert set(rows) == set(ex.QUICK)
    assert rows["fixed+ef+q8"]["uplink_bits_mean"] < 0.35 * rows["fixed+ef"]["uplink_bits_mean"]
    assert rows["fixed+ef"]["uplink_bits_mean"] == rows["fixed"]["uplink_bits_mean"]  # same keep, same bits
    assert set(s["paired_at_equal_bits"]) == {"topk+ef", "fixed"}
    run = RunConfig.from_dict(json.loads((tmp_path / "runs/linear/fixed+ef/seed0/history.json").read_text())["config"])
    assert run.error_feedback == "rotated" and run.strategy == "fixed"
    assert (tmp_path / "communication_linear.png").stat().st_size > 20_000
