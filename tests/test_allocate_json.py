"""`tsfa allocate`: the documented JSON example round-trips; bad input is one line and exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tsfa.cli import main
from tsfa.jsonio import allocate_json, parse_round
from tsfa.online import allocate

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "round.json"


def test_example_round_trips(tmp_path, capsys):
    out_path = tmp_path / "alloc.json"
    assert main(["allocate", "--input", str(EXAMPLE), "--output", str(out_path)]) == 0
    out = json.loads(out_path.read_text())
    prob, backend, budget = parse_round(EXAMPLE.read_text())
    ref = allocate(prob, backend=backend)
    assert out["schema"] == "tsfa.allocation/1" and out["status"] == "optimal"
    assert out["keep"] == ref.keep.tolist() and out["latency_s"] == pytest.approx(ref.latency_s, rel=1e-12)
    assert len(out["bandwidth_hz"]) == prob.num_clients
    assert sum(out["bandwidth_hz"]) <= prob.total_bandwidth_hz * (1 + 1e-9)
    assert out["next_queue"] == pytest.approx(max(prob.queue + ref.latency_s - budget, 0.0))
    assert out["payload_bits"] == prob.shape.payload_bits(np.array(out["keep"])).tolist()


def test_stdin_and_custom_modules():
    d = json.loads(EXAMPLE.read_text())
    d["shape"] = {"modules": [{"name": "q", "out_features": 64, "in_features": 32},
                              {"name": "v", "out_features": 64, "in_features": 32}], "rank": 8}
    d.pop("latency_budget_s")
    proc = subprocess.run([sys.executable, "-m", "tsfa.cli", "allocate", "--input", "-"], input=json.dumps(d),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert "next_queue" not in out and out["status"] == "optimal"


@pytest.mark.parametrize("mutate,match", [
    (lambda s: s[:-5], "malformed JSON at line"),
    (lambda s: "[1, 2]", "must be a JSON object"),
    (lambda s: _drop(s, "snr_hz"), "snr_hz is missing"),
    (lambda s: _drop(s, "shape"), "shape is missing"),
    (lambda s: _set(s, "queue", "high"), "queue must be a number"),
    (lambda s: _set(s, "snr_hz", "fast"), "snr_hz must be a list"),
    (lambda s: _set(s, "allow_skip", 1), "allow_skip must be true or false"),
    (lambda s: _set(s, "min_keep", 1.5), "min_keep must be an integer"),
    (lambda s: _set(s, "backend", "gurobi"), "backend must be one of"),
    (lambda s: _set(s, "colour", 1), "unknown fields"),
    (lambda s: s.replace('"queue": 1.5', '"queue": NaN'), "NaN is not valid JSON"),
    (lambda s: s.replace('"queue": 1.5', '"queue": Infinity'), "Infinity is not valid JSON"),
    (lambda s: s.replace('"queue": 1.5', '"queue": 1e999'), "queue must be finite"),
    (lambda s: _set(s, "compute_s", [0.1]), "compute_s"),
    (lambda s: _set(s, "shape", {"preset": "gpt5", "rank": 8}), "shape.preset must be one of"),
    (lambda s: _set(s, "queue", -1.0), "queue"),
    (lambda s: _set(s, "value_bits", [8, 4]), "rounding_profile must be a list"),
    (lambda s: _set(s, "value_bits", "auto"), "value_bits must be a non-empty list"),
    (lambda s: _set(s, "rounding_profile", []), "value_bits must be a non-empty list"),
    (lambda s: _set(_set(s, "value_bits", [8]), "rounding_profile", [[[0.0]], [[0.0], [1.0]]]), "rows differ"),
    (lambda s: _set(_set(s, "value_bits", [8]), "rounding_profile", [[[0.0]]]), "rounding_profile must have shape"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, mutate, match):
    p = tmp_path / "bad.json"
    p.write_text(mutate(EXAMPLE.read_text()))
    assert main(["allocate", "--input", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tsfa: error: ") and err.count("\n") == 1 and match in err, err


def test_missing_file(capsys):
    assert main(["allocate", "--input", "/nonexistent/round.json"]) == 2
    assert "cannot read --input" in capsys.readouterr().err


def _drop(s, key):
    d = json.loads(s)
    d.pop(key)
    return json.dumps(d)


def _set(s, key, value):
    d = json.loads(s)
    d[key] = value
    return json.dumps(d)


def test_library_entry_point():
    out = allocate_json(EXAMPLE.read_text())
    assert out["status"] == "optimal"


def test_precision_choice_round_trips():
    """value_bits and rounding_profile: the output names each client's precision, and equals the
    library's allocation of the same problem."""
    d = json.loads(EXAMPLE.read_text())
    k, r = len(d["snr_hz"]), len(d["error_profile"][0]) - 1
    d["value_bits"] = [32, 8, 4]
    d["rounding_profile"] = [[[0.0, 1e-4 * s, 3e-2 * s] for s in range(r + 1)] for _ in range(k)]
    out = allocate_json(json.dumps(d))
    prob, backend, _ = parse_round(json.dumps(d))
    ref = allocate(prob, backend=backend)
    assert out["status"] == "optimal" and out["keep"] == ref.keep.tolist()
    assert out["value_bits"] == ref.value_bits.tolist() and set(out["value_bits"]) <= {32, 8, 4}
    assert out["payload_bits"] == ref.payload_bits.tolist()
    assert out["rounding_energy"] == pytest.approx(ref.rounding_energy)
