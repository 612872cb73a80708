import subprocess
import sys

import tsfa


def run(*args):
    return subprocess.run([sys.executable, "-m", "tsfa.cli", *args], capture_output=True, text=True, timeout=300)


def test_version():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"tsfa {tsfa.__version__}"


def test_bandwidth_demo_prints_table():
    out = run("bandwidth-demo", "--clients", "6", "--seed", "3")
    assert out.returncode == 0, out.stderr
    assert "round latency, optimal split" in out.stdout
    assert out.stdout.count("\n") > 10
    for backend in ("fast", "cvxpy", "scipy"):
        assert f"backend {backend}" in out.stdout


def test_bad_input_one_line_exit_2():
    out = run("bandwidth-demo", "--clients", "0")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "--clients" in out.stderr
    assert "Traceback" not in out.stderr


def test_design_prints_the_plan_table(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'task = "linear"\nstrategy = "tsfa"\nrounds = 6\nclients = 4\nrank = 4\nkeep = 1\n'
                   f'lr = 0.05\nout = "{tmp_path / "plan"}"\n[linear]\ndim = 16\n')
    out = run("design", str(cfg), "--pilot-rounds", "4", "--ranks", "1", "2", "4", "--draws", "40", "--quiet")
    assert out.returncode == 0, out.stderr
    assert "rank" in out.stdout and "lat mean" in out.stdout and "*" in out.stdout
    assert (tmp_path / "plan" / "plan.csv").is_file() and (tmp_path / "plan" / "plan.json").is_file()
    bad = run("design", str(tmp_path / "missing.toml"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_main_job_quick(tmp_path):
    import json

    out = run("demo", "--quick", "--quiet", "--out", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bit savings" in out.stdout and "latency/τ̄" in out.stdout
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    table = {r["strategy"]: r for r in summary["table"]}
    assert set(table) == {"tsfa", "fedit", "ideal", "head"}
    assert table["tsfa"]["uplink_mbit"] < table["fedit"]["uplink_mbit"]
    assert "@tsfa bits" in out.stdout
    # at tsfa's uplink bits, tsfa's own entry is its final metric; fedit had fewer rounds in that budget
    assert table["tsfa"]["at_equal_bits"] == table["tsfa"]["final"]
    assert table["head"]["uplink_mbit"] == 0 and table["head"]["final"] == table["head"]["at_equal_bits"]
    tsfa_rounds = json.loads((tmp_path / "demo" / "tsfa" / "history.json").read_text())["rounds"]
    # the first rounds no longer alternate between uploading everything and skipping the round
    assert all(r["scheduled"] > 0 for r in tsfa_rounds)
    for name in ("compare.png", "bound.png", "tsfa/run.png", "plan.csv", "summary.csv"):
        assert (tmp_path / "demo" / name).is_file(), name


def test_benchmark_prints_the_protocol_table(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'task = "linear"\nrounds = 3\nclients = 4\nrank = 4\nkeep = 1\nlr = 0.05\n'
                   f'out = "{tmp_path / "ignored"}"\n[linear]\ndim = 12\nsamples = 48\ntest_samples = 128\n')
    out = run("benchmark", str(cfg), "--strategies", "fedit", "head", "tsfa", "--seeds", "2", "--quiet",
              "--out", str(tmp_path / "bench"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bits-to-target" in out.stdout and "not reached" in out.stdout  # head never learns on linear
    assert out.stdout.count("±") >= 3 and "2 paired seeds" in out.stdout
    for name in ("summary.csv", "summary.json", "rounds.csv", "benchmark.png", "tsfa/seed1/history.json"):
        assert (tmp_path / "bench" / name).is_file(), name
    bad = run("benchmark", str(cfg), "--strategies", "fedit", "nope", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "strategies" in bad.stderr
    assert "Traceback" not in bad.stderr
