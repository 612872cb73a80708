import subprocess
import sys

import tsfa


def run(*args):
    return subprocess.run([sys.executable, "-m", "tsfa.cli", *args], capture_output=True, text=True, timeout=300)


def test_version():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"tsfa {tsfa.__version__}"


def test_demo_prints_table():
    out = run("demo", "--clients", "6", "--seed", "3")
    assert out.returncode == 0, out.stderr
    assert "round latency, optimal split" in out.stdout
    assert out.stdout.count("\n") > 10
    for backend in ("fast", "cvxpy", "scipy"):
        assert f"backend {backend}" in out.stdout


def test_bad_input_one_line_exit_2():
    out = run("demo", "--clients", "0")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "--clients" in out.stderr
    assert "Traceback" not in out.stderr
