"""Seconds per round of the federated loop on Flower against the in-process loop, in one run.

Task ``linear`` (dim 16, 64 samples per client), strategy ``tsfa``, K = 3 clients, rank 4,
keep 1, ``--rounds`` rounds (default 6). Columns:

* in-process: ``fedloop.run`` (the K clients in this process);
* deployment: a SuperLink and K SuperNodes as separate processes on 127.0.0.1, each node
  ``python -m fedloop.flower_node supernode --poll-interval 0.05`` (the ClientApp in one
  long-lived process per node, the task built once), the run started with ``flwr run``;
* deployment, stock nodes (``--stock``): plain ``flower-supernode`` (a fresh ``flwr-clientapp``
  process per message, Flower's 3 s idle polling), for comparison;
* simulation: ``fedloop.flower.run_flower`` (a private SuperLink in simulation mode, ``flwr run``).

Per-round seconds are the median over rounds 2..N of the wall time each round took, as the
ServerApp logs it (``fedloop: round t took ... s``: both message exchanges and the server's
work) — for in-process the same span (``Server.step`` plus checkpoint) from a round callback.
Start-up (processes, Ray, the first task build) is reported apart, as "total".

    python benchmarks/flower.py [--rounds 6] [--stock] [--no-simulation] [--poll 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "flower_app"
BIN = Path(sys.executable).parent
ROUND_LOG = re.compile(r"fedloop: round (\d+) took ([0-9.]+) s")
EXCHANGES = re.compile(r"fedloop: round (\d+) took ([0-9.]+) s \(wall time; message exchanges ([0-9.]+) \+ ([0-9.]+) s")
TASK_LOG = re.compile(r"fedloop: task took ([0-9.]+) s \(pull ([0-9.]+), ClientApp ([0-9.]+), push ([0-9.]+), "
                      r"task output ([0-9.]+)\)")


def breakdown(folder) -> str:
    """Where a deployment round's time goes (rounds 2.., messages after each node's first): the
    ServerApp's two exchanges and its own work, and per message on the nodes the task's steps."""
    text = (folder / "flwr-run.log").read_text()
    rounds = [tuple(map(float, m[1:])) for m in EXCHANGES.findall(text)][1:]
    tasks = []
    for log in sorted(folder.glob("node*.log")):
        tasks += [tuple(map(float, m)) for m in TASK_LOG.findall(log.read_text())][2:]
    if not rounds or not tasks:
        return ""
    med = lambda xs: statistics.median(xs)  # noqa: E731
    wall, ex1, ex2 = (med([r[i] for r in rounds]) for i in range(3))
    steps = [med([t[i] for t in tasks]) for i in range(5)]
    return (f"deployment, median per round: exchanges {ex1:.3f} + {ex2:.3f} s, server work {wall - ex1 - ex2:.3f} s; "
            f"per message on a node: {steps[0]:.3f} s (pull {steps[1]:.3f}, ClientApp {steps[2]:.3f}, "
            f"push {steps[3]:.3f}, task output {steps[4]:.3f}); the rest of an exchange is SuperLink <-> "
            f"SuperNode transit and the server's pulls")


def config(out, rounds, clients=3):
    return dict(task="linear", strategy="tsfa", rounds=rounds, clients=clients, rank=4, keep=1, lr=0.02,
                checkpoint_every=1, out=str(out), linear={"dim": 16, "samples": 64, "test_samples": 256})


def per_round(seconds):
    steady = seconds[1:] or seconds
    return statistics.median(steady) if steady else float("nan")


def in_process(folder, rounds):
    from fedloop import RunConfig, run

    stamps = []
    t0 = time.perf_counter()
    run(RunConfig(**config(folder / "inproc", rounds)), progress=False,
        callbacks=[lambda row: stamps.append(time.perf_counter())])
    total = time.perf_counter() - t0
    # span of round t: from the end of round t-1 (its checkpoint included) to the end of round t
    return [stamps[0] - t0] + [b - a for a, b in zip(stamps, stamps[1:], strict=False)], total


def deployment(folder, rounds, stock=False, clients=3, poll=0.05):
    import httpx

    from fedloop.flower import free_ports

    link, *nodes = free_ports(1 + clients)
    home = folder / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = dict(os.environ, FLWR_HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    procs = []

    def start(name, args):
        log = open(folder / f"{name}.log", "w")
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder, start_new_session=True)
        procs.append(p)
        return p

    t0 = time.perf_counter()
    try:
        start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link),
                            "--disable-runtime-dependency-installation"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{link}/health", timeout=1).is_success:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        for k, port in enumerate(nodes):
            node = [str(BIN / "flower-supernode")] if stock else \
                [sys.executable, "-m", "fedloop.flower_node", "supernode", "--poll-interval", str(poll)]
            start(f"node{k}", [*node, "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(port),
                               "--node-config", f"partition-id={k} num-partitions={clients}"])
        cfg = config(folder / "run", rounds, clients)
        overrides = {k.replace("_", "-"): v for k, v in cfg.items() if k != "linear"}
        overrides.update({f"linear.{k.replace('_', '-')}": v for k, v in cfg["linear"].items()})
        overrides.update({"round-timeout": 120.0, "poll-interval": poll})
        runner = start("flwr-run", [str(BIN / "flwr"), "run", str(APP), "bench", "--stream", "-c",
                                    " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())])
        runner.wait(timeout=900)
        total = time.perf_counter() - t0
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, 9)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)
    text = (folder / "flwr-run.log").read_text()
    seconds = [float(s) for _, s in ROUND_LOG.findall(text)]
    if len(seconds) != rounds:
        raise RuntimeError(f"the deployment logged {len(seconds)} of {rounds} rounds; see {folder}/*.log\n"
                           f"{text[-3000:]}")
    return seconds, total


def simulation(folder, rounds):
    from fedloop import RunConfig
    from fedloop.flower import run_flower

    t0 = time.perf_counter()
    log = folder / "simulation.log"
    run_flower(RunConfig(**config(folder / "sim", rounds)), log_file=log)
    total = time.perf_counter() - t0
    seconds = [float(s) for _, s in ROUND_LOG.findall(log.read_text())]
    return seconds, total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--stock", action="store_true", help="also time stock flower-supernode nodes")
    ap.add_argument("--no-simulation", action="store_true")
    ap.add_argument("--poll", type=float, default=0.05, help="poll interval of the long-lived nodes and the server (s)")
    ap.add_argument("--keep", metavar="DIR", help="keep the runs' folders and logs in DIR")
    args = ap.parse_args(argv)
    if args.rounds < 2:
        ap.error(f"--rounds must be >= 2 (round 1 includes start-up); got --rounds {args.rounds}")
    rows, notes = [], ""
    with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
        tmp = Path(args.keep or tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        runs = [("in-process", lambda d: in_process(d, args.rounds))]
        runs.append(("deployment (fedloop.flower_node)", lambda d: deployment(d, args.rounds, poll=args.poll)))
        if args.stock:
            runs.append(("deployment (stock flower-supernode)", lambda d: deployment(d, args.rounds, stock=True)))
        if not args.no_simulation:
            runs.append(("simulation (run_flower)", lambda d: simulation(d, args.rounds)))
        for name, fn in runs:
            d = tmp / re.sub(r"\W+", "-", name)
            d.mkdir(exist_ok=True)
            seconds, total = fn(d)
            rows.append((name, per_round(seconds), total))
            print(f"  {name}: rounds {[round(s, 3) for s in seconds]}", flush=True)
            if name == "deployment (fedloop.flower_node)":
                notes = breakdown(d)
    base = rows[0][1]
    print(f"\nlinear, K = 3, tsfa, {args.rounds} rounds (per round: median of rounds 2..{args.rounds})")
    print(f"{'':40s} {'s/round':>9s} {'× in-process':>13s} {'total s':>9s}")
    for name, sec, total in rows:
        print(f"{name:40s} {sec:9.3f} {sec / base:13.2f} {total:9.1f}")
    if notes:
        print(notes)


if __name__ == "__main__":
    main()
