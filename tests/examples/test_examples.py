"""Every example runs headless in a shortened form and writes its figure and numbers."""

import csv
import importlib.util
from pathlib import Path

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
