"""Hostile inputs at the loop's trust boundaries: checkpoints, run folders, ledgers, configs, the CLI."""

import hashlib
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedloop import LocalPool, RunConfig, Server, run
from fedloop.checkpoint import CHECKPOINT, CheckpointError, RunFolder, RunFolderBusy
from fedloop.client import Upload
from tsfa.cli import main


def lin(out, **kw):
    base = dict(task="linear", strategy="tsfa", rounds=2, clients=3, rank=4, keep=2, lr=0.02, checkpoint_every=1,
                out=str(out), linear={"dim": 8, "samples": 32, "test_samples": 64})
    base.update(kw)
    return RunConfig(**base)


def write_toml(path: Path, cfg: RunConfig, **raw) -> Path:
    """A TOML file of ``cfg`` with some keys replaced by raw TOML text."""
    d = {k: v for k, v in cfg.to_dict().items() if v is not None and k not in ("linear", "distill")}
    lines = [f"{k} = {raw.pop(k) if k in raw else json.dumps(v)}" for k, v in d.items()]
    lines += [f"{k} = {v}" for k, v in raw.items() if not k.startswith("[")]
    table = raw.get("[linear]", "dim = 8\nsamples = 32\ntest_samples = 64")
    path.write_text("\n".join(lines) + f"\n[linear]\n{table}\n")
    return path


def snapshot(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tsfa: error: "), err
    return err[0]


class Marker:
    """Unpickling this creates a file: the proof that a checkpoint ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished") / "run"
    run(lin(folder), progress=False)
    return folder


@pytest.mark.parametrize("name", [CHECKPOINT, "checkpoint.pt"])
def test_a_crafted_pickle_checkpoint_never_runs(tmp_path, capsys, name):
    folder = tmp_path / "run"
    folder.mkdir()
    marker = tmp_path / "pwned"
    (folder / name).write_bytes(pickle.dumps({"round": Marker(marker)}))
    before = snapshot(folder)
    cfg = write_toml(tmp_path / "c.toml", lin(folder))
    assert main(["run", str(cfg), "--resume", "--quiet"]) == 2
    line = one_error_line(capsys)
    assert "pickle" in line or "not a tsfa checkpoint" in line or "corrupt" in line
    assert not marker.exists() and snapshot(folder) == before


def tensor_regions(path: Path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__"}


def test_one_flipped_bit_in_any_tensor_or_the_state_is_detected(finished, tmp_path):
    path = finished / CHECKPOINT
    good = path.read_bytes()
    regions = tensor_regions(path)
    assert len(regions) >= 4  # global A and B of two modules at least
    (n,) = struct.unpack("<Q", good[:8])
    state_at = good.index(b'"state"', 8, 8 + n) + 20  # inside the state's JSON text
    offsets = [(a + b) // 2 for a, b in regions.values()] + [state_at]
    for offset in offsets:
        bad = bytearray(good)
        bad[offset] ^= 0x04
        copy = tmp_path / f"flip{offset}"
        copy.mkdir()
        (copy / CHECKPOINT).write_bytes(bytes(bad))
        before = snapshot(copy)
        with pytest.raises(CheckpointError, match="SHA-256 mismatch|corrupt"):
            run(lin(copy, rounds=3), resume=True, progress=False)
        assert snapshot(copy) == before


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"\xff" * 64, b"not a checkpoint at all"])
def test_empty_or_garbage_checkpoint_is_one_cli_line(tmp_path, capsys, content):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / CHECKPOINT).write_bytes(content)
    cfg = write_toml(tmp_path / "c.toml", lin(folder))
    assert main(["run", str(cfg), "--resume", "--quiet"]) == 2
    assert CHECKPOINT in one_error_line(capsys)


def test_resume_refuses_a_checkpoint_of_another_run(finished, tmp_path):
    import shutil

    shutil.copytree(finished, tmp_path / "run")
    with pytest.raises(CheckpointError, match="different config"):
        run(lin(tmp_path / "run", rounds=3, lr=0.5), resume=True, progress=False)
    # and a checkpoint that is sound resumes exactly where it stopped
    h = run(lin(tmp_path / "run", rounds=3), resume=True, progress=False)
    assert len(h.rounds) == 3


def test_out_must_name_a_folder_checked_before_training(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="out must be a non-empty path"):
        lin("")
    with pytest.raises(ValueError, match="out must be a non-empty path"):
        RunConfig(task="linear", out=123)
    f = tmp_path / "a_file"
    f.write_text("keep me")
    import fedloop.loop

    def no_server(cfg):
        raise AssertionError("the server (task, model, data) was built before out was checked")

    monkeypatch.setattr(fedloop.loop, "Server", no_server)
    with pytest.raises(ValueError, match="is a file"):
        run(lin(f), progress=False)
    assert f.read_text() == "keep me"


def test_a_second_run_on_the_same_folder_stops_at_once(tmp_path, monkeypatch):
    import fedloop.loop

    folder = tmp_path / "run"
    real_server = fedloop.loop.Server
    with RunFolder(folder):
        monkeypatch.setattr(fedloop.loop, "Server", lambda cfg: pytest.fail("built a server on a busy folder"))
        with pytest.raises(RunFolderBusy, match="in use by another run"):
            run(lin(folder), progress=False)
        assert not (folder / CHECKPOINT).exists()
    monkeypatch.setattr(fedloop.loop, "Server", real_server)
    assert len(run(lin(folder), progress=False).rounds) == 2  # released on exit


def test_the_lock_of_a_killed_run_is_recovered(tmp_path):
    folder = tmp_path / "run"
    code = (f"import time; from fedloop.checkpoint import RunFolder\n"
            f"with RunFolder({str(folder)!r}):\n    print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy):
            run(lin(folder), progress=False)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    assert not any(folder.iterdir())  # the lock is on the folder itself: nothing to clean up
    assert len(run(lin(folder), progress=False).rounds) == 2


@pytest.mark.parametrize("raw, key", [
    ({"test_fraction": '"0.1"'}, "test_fraction"),
    ({"out": "123"}, "out"),
    ({"penalty": "true"}, "penalty"),
    ({"[linear]": 'dim = "x"'}, "linear.dim"),
    ({"[linear]": "dim = 0"}, "linear.dim"),
    ({"[linear]": "noise = -1.0"}, "linear.noise"),
    ({"[linear]": "colour = 3"}, "colour"),
    ({"reject_norm_factor": "0.5"}, "reject_norm_factor"),
])
def test_bad_config_values_are_one_line_naming_the_key(tmp_path, capsys, raw, key):
    cfg = write_toml(tmp_path / "c.toml", lin(tmp_path / "run"), **raw)
    assert main(["run", str(cfg), "--quiet"]) == 2
    assert key in one_error_line(capsys)
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


@pytest.mark.parametrize("ledger, why", [
    ([], "JSON object"),
    ({"rounds": None}, "rounds must be"),
    ({"rounds": [{"round": 1}]}, "lacks the columns"),
    ({"rounds": [{"round": 1, "latency_s": {"x": 1}}]}, "latency_s"),
    ({"rounds": []}, "no rounds"),
    ({"config": [], "rounds": []}, "config must be"),
])
@pytest.mark.parametrize("command", ["plot", "compare"])
def test_a_bad_ledger_is_one_cli_line(tmp_path, capsys, ledger, why, command):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "history.json").write_text(json.dumps(ledger))
    argv = [command, str(folder)] + (["--out", str(tmp_path / "cmp")] if command == "compare" else [])
    assert main(argv) == 2
    assert why in one_error_line(capsys)


def test_a_figure_into_a_missing_folder_is_one_cli_line(finished, tmp_path, capsys):
    assert main(["plot", str(finished), "--out", str(tmp_path / "missing" / "deeper" / "x.png")]) in (0, 2)
    err = capsys.readouterr().err.strip()
    assert not err or (len(err.splitlines()) == 1 and err.startswith("tsfa: error: "))


def test_uploads_are_validated_at_the_trust_boundary(tmp_path):
    server = Server(lin(tmp_path / "run", strategy="fixed"))
    pool = LocalPool(server)
    pool.train(0)
    up = pool.upload(0, [0], {0: 2}, {0: 1e6})[0]
    server.global_head = {"w": torch.zeros(2)}  # a run with a head: its tensors, shapes and values are checked
    good = torch.zeros(2)
    assert server.check_upload(Upload(payload=up.payload, bits=up.bits, head={"w": good}), 2).keep == 2
    nan = torch.tensor([0.0, float("nan")])
    for head, why in (({"w": nan}, "not a finite"), ({"w": torch.zeros(3)}, "not a finite"),
                      ({"v": good}, "head tensors"), ({"w": [0.0, 0.0]}, "not a finite")):
        with pytest.raises(ValueError, match=why):
            server.check_upload(Upload(payload=up.payload, bits=up.bits, head=head), 2)
    with pytest.raises(ValueError, match="components"):
        server.check_upload(Upload(payload=up.payload, bits=up.bits, head={"w": good}), 3)
    with pytest.raises(ValueError):
        server.check_upload(Upload(payload=up.payload[:-1], bits=up.bits, head={"w": good}), 2)


class Inflating(LocalPool):
    """Client 1's update is 100 times what it trained (a finite, well-formed, hostile payload)."""

    def train(self, t):
        report = super().train(t)
        g = self.server.global_factors
        self.local_factors[1] = {n: tuple(o + 100 * (x - o) for o, x in zip(g[n], pair, strict=True))
                                 for n, pair in self.local_factors[1].items()}
        return report


@pytest.mark.parametrize("factor", [None, 3.0])
def test_the_norm_rule_rejects_an_outsized_update(tmp_path, factor):
    server = Server(lin(tmp_path / "run", strategy="fixed", clients=4, reject_norm_factor=factor))
    row = server.step(Inflating(server))
    status = server.history.clients[1]["status"]
    if factor is None:
        assert status == "ok" and row["scheduled"] == 4
    else:
        assert status.startswith("rejected: update norm") and row["scheduled"] == 3
        assert server.history.clients[1]["uplink_bits"] == 0


# -- property tests: any document either validates or is one ValueError naming what is wrong --------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fedloop import History  # noqa: E402

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=4), max_leaves=12)
FIELDS = sorted(RunConfig.__dataclass_fields__)


@settings(derandomize=True, deadline=None, max_examples=300, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(FIELDS + ["colour"]), json_values, max_size=4))
def test_any_config_document_validates_or_is_a_value_error(doc):
    try:
        cfg = RunConfig.from_dict({"task": "linear", **doc})
    except ValueError as exc:
        assert str(exc)
        return
    assert RunConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


@settings(derandomize=True, deadline=None, max_examples=300, suppress_health_check=list(HealthCheck))
@given(json_values | st.fixed_dictionaries({"rounds": st.lists(json_values, max_size=3)},
                                           optional={"config": json_values, "clients": json_values}))
def test_any_ledger_document_loads_or_is_a_value_error(doc):
    try:
        h = History.from_dict(doc)
    except ValueError as exc:
        assert str(exc)
        return
    assert all(isinstance(r, dict) for r in h.rounds)


@settings(derandomize=True, deadline=None, max_examples=40, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=200))
def test_any_bytes_as_a_checkpoint_are_refused_in_one_line(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("bytes")
    (folder / CHECKPOINT).write_bytes(data)
    with pytest.raises(CheckpointError, match=CHECKPOINT):
        from fedloop.checkpoint import load_checkpoint

        load_checkpoint(folder)


@pytest.mark.parametrize("field, value", [("reorthogonalize", "x"), ("reorthogonalize", 1), ("test_fraction", True),
                                          ("rank", 2.0), ("out", ""), ("relative_v", float("nan")),
                                          ("initial_queue", [0.0]), ("linear", {"dim": True})])
def test_each_bad_field_is_a_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=field.split(".")[0] if field != "linear" else "linear.dim"):
        RunConfig(task="linear", **{field: value})


# -- checkpoints with a valid digest but content that does not fit the run -------------------------
def _craft(src: Path, dst: Path, edit) -> Path:
    """A copy of ``src``'s checkpoint, changed by ``edit(tensors, state)``, re-signed (a valid SHA-256)."""
    from fedloop.checkpoint import load_checkpoint, save_checkpoint

    tensors, state = load_checkpoint(src)
    edit(tensors, state)
    dst.mkdir(parents=True)
    save_checkpoint(dst, tensors, state)
    return dst


def _set(path, value):
    def edit(tensors, state):
        node = state
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


@pytest.mark.parametrize("name, edit", [
    ("bf16 tensor", lambda t, s: t.update({"global/m0/A": t["global/m0/A"].to(torch.bfloat16)})),
    ("NaN tensor", lambda t, s: t["global/m0/A"].view(-1).__setitem__(0, float("nan"))),
    ("inf folded", lambda t, s: t.update({"folded/m0": torch.full((8, 8), float("inf"))})),
    ("float64 folded", lambda t, s: t.update({"folded/m0": torch.zeros(8, 8, dtype=torch.float64)})),
    ("policy list", _set(["policy"], [1])),
    ("policy queue", _set(["policy", "queue"], -1)),
    ("policy budget", _set(["policy", "latency_budget_s"], 1e6)),
    ("policy round", _set(["policy", "round"], 99)),
    ("ledger text", _set(["history", "rounds", 1, "test_loss"], "NaN")),
    ("ledger huge", _set(["history", "rounds", 0, "uplink_bits"], 10**400)),
    ("ledger meta", _set(["history", "meta", "latency_budget_s"], "x")),
    ("ledger client", _set(["history", "clients", 0, "keep"], "x")),
    ("ledger config", _set(["history", "config", "seed"], 7)),
    ("wallclock", _set(["wallclock"], 10**400)),
])
def test_a_re_signed_checkpoint_that_does_not_fit_is_refused(finished, tmp_path, capsys, name, edit):
    folder = _craft(finished, tmp_path / "run", edit)
    before = snapshot(folder)
    with pytest.raises(CheckpointError):
        run(lin(folder, rounds=3), resume=True, progress=False)
    assert snapshot(folder) == before
    cfg = write_toml(tmp_path / "c.toml", lin(folder, rounds=3))
    assert main(["run", str(cfg), "--resume", "--quiet"]) == 2
    assert CHECKPOINT in one_error_line(capsys) and snapshot(folder) == before


@pytest.mark.parametrize("argv", [
    ["run", "CFG", "--rounds", "x"], ["allocate"], ["allocate", "--input", "x", "--indent", "x"], ["magic"], [],
    ["bandwidth-demo", "--clients", "100000000000"], ["benchmark", "CFG", "--seeds", "100000000000000000000"],
    ["demo", "--quick", "--out", ""], ["compare", "R", "--out", ""], ["design", "CFG", "--pilot", "R", "--out", "FILE"],
    ["demo", "--quick", "--out", "FILE/x"],
])
def test_argument_mistakes_are_one_line(finished, tmp_path, capsys, argv):
    cfg = write_toml(tmp_path / "c.toml", lin(tmp_path / "run"))
    (tmp_path / "FILE").write_text("x")
    subs = {"CFG": str(cfg), "R": str(finished), "FILE": str(tmp_path / "FILE"), "FILE/x": str(tmp_path / "FILE" / "x")}
    assert main([subs.get(a, a) for a in argv]) == 2
    one_error_line(capsys)


@pytest.mark.parametrize("raw, key", [({"latency_budget_s": "1e200"}, "latency_budget_s"),
                                      ({"[linear]": "dim = 100000000000000000000"}, "linear.dim"),
                                      ({"seed": "18446744073709551616"}, "seed")])
def test_numbers_beyond_reason_are_one_line(tmp_path, capsys, raw, key):
    cfg = write_toml(tmp_path / "c.toml", lin(tmp_path / "run"), **raw)
    assert main(["run", str(cfg), "--quiet"]) == 2
    assert key in one_error_line(capsys)


def test_a_deeply_nested_toml_is_one_line(tmp_path, capsys):
    (tmp_path / "deep.toml").write_text("seed = " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert main(["run", str(tmp_path / "deep.toml")]) == 2
    assert "not valid TOML" in one_error_line(capsys)


@pytest.mark.parametrize("edit, why", [
    (lambda h: h["rounds"][0].update(uplink_bits=10**400), "uplink_bits"),
    (lambda h: h["rounds"][0].update(uplink_bits="12"), "uplink_bits"),
    (lambda h: h["config"].update(task=["x"]), "config.task"),
    (lambda h: h["meta"].update(latency_budget_s="x"), "meta.latency_budget_s"),
    (lambda h: h["rounds"][0].update(test_loss=float("inf")), "test_loss"),
])
def test_a_ledger_that_would_crash_the_figures_is_refused(finished, tmp_path, capsys, edit, why):
    h = json.loads((finished / "history.json").read_text())
    edit(h)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "history.json").write_text(json.dumps(h))
    for argv in (["plot", str(folder)], ["compare", str(folder), "--out", str(tmp_path / "cmp")]):
        assert main(argv) == 2
        assert why in one_error_line(capsys)


class Malformed(LocalPool):
    """A pool whose answers break the protocol in a chosen way."""

    def __init__(self, server, how):
        super().__init__(server)
        self.how = how

    def train(self, t):
        report = super().train(t)
        if self.how == "short profiles":
            return report._replace(profiles=report.profiles[:-1])
        if self.how == "status None":
            return report._replace(status=None)
        if self.how == "not a report":
            return {"profiles": report.profiles}
        return report

    def upload(self, t, sent, keep, bandwidth_hz):
        out = super().upload(t, sent, keep, bandwidth_hz)
        if self.how == "negative bits":
            out[0] = out[0]._replace(bits=-10**6)
        if self.how == "a tuple":
            out[0] = tuple(out[0])
        return out


@pytest.mark.parametrize("how", ["short profiles", "status None", "not a report"])
def test_a_malformed_report_is_a_value_error(tmp_path, how):
    server = Server(lin(tmp_path / "run", strategy="fixed"))
    with pytest.raises(ValueError, match="pool.train"):
        server.step(Malformed(server, how))


@pytest.mark.parametrize("how", ["negative bits", "a tuple"])
def test_a_malformed_upload_drops_only_that_client(tmp_path, how):
    server = Server(lin(tmp_path / "run", strategy="fixed"))
    row = server.step(Malformed(server, how))
    assert server.history.clients[0]["status"] != "ok" and server.history.clients[0]["uplink_bits"] == 0
    assert row["uplink_bits"] >= 0 and row["scheduled"] == 2
