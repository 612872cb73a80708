"""The ``tsfa`` command line. Heavy imports stay inside the subcommands.

Bad user input prints one line (``tsfa: error: ...``) and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from tsfa._version import __version__


class UserError(Exception):
    """An input problem the user can fix; printed as one line, exit code 2."""


def _demo(args: argparse.Namespace) -> int:
    from fedloop.checkpoint import check_run_folder
    from fedloop.data import TaskUnavailable
    from fedloop.demo import main_job

    check_run_folder(args.out)
    try:
        main_job(args.out, quick=args.quick, seed=args.seed, progress=not args.quiet)
    except TaskUnavailable as exc:
        raise UserError(str(exc)) from None
    return 0


def _bandwidth_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from tsfa import Cell, llama_7b_qv, min_latency_bandwidth, minilm_l6_qv, rate_bps, training_flops_per_sample

    if not 1 <= args.clients <= 100_000:
        raise UserError(f"--clients must be in 1..100000; got {args.clients}")
    if not 1 <= args.rank <= 384:
        raise UserError(f"--rank must be in 1..384 (MiniLM's width); got {args.rank}")
    rng = np.random.default_rng(args.seed)
    cell = Cell()
    clients = cell.sample_clients(args.clients, rng=rng)
    snr = cell.sample_snr_hz(clients, rng=rng)
    shape = minilm_l6_qv(args.rank)
    flops = args.local_steps * args.batch_size * training_flops_per_sample(22.7e6, 64)
    compute = clients.compute_time_s(flops)
    downlink = shape.downlink_bits / rate_bps(cell.total_bandwidth_hz, float(np.median(snr)))
    payload = np.full(len(clients), shape.dense_payload_bits)

    print(f"tsfa {__version__} demo — min–max latency bandwidth split (spec §2)")
    print(
        f"cell: {len(clients)} clients in a {cell.radius_m:.0f} m cell, B = {cell.total_bandwidth_hz / 1e6:g} MHz, "
        f"P = {cell.transmit_power_w} W, N0 = {cell.noise_psd_dbm_hz} dBm/Hz, seed {args.seed}"
    )
    print(
        f"LoRA: all-MiniLM-L6-v2 q/v, r = {shape.rank}, {shape.num_modules} modules, "
        f"M = {shape.values_per_component} values per component; dense upload "
        f"{shape.dense_payload_bits / 1e6:.3f} Mbit, downlink {shape.downlink_bits / 1e6:.3f} Mbit ({downlink:.3f} s)"
    )
    res = {b: min_latency_bandwidth(payload, snr, compute, cell.total_bandwidth_hz, downlink_s=downlink, backend=b)
           for b in ("fast", "cvxpy", "scipy")}
    fast = res["fast"].raise_for_status()
    equal = np.full(len(clients), cell.total_bandwidth_hz / len(clients))
    equal_latency = downlink + np.max(compute + payload / rate_bps(equal, snr))
    print()
    print(f"{'client':>6} {'dist m':>7} {'SNR dB':>7} {'compute s':>9} {'b MHz':>7} {'upload s':>8} {'finish s':>8}")
    snr_db = 10 * np.log10(snr / cell.total_bandwidth_hz)  # SNR over the whole band
    for k in range(len(clients)):
        print(
            f"{k:>6} {clients.distance_m[k]:>7.0f} {snr_db[k]:>7.1f} {compute[k]:>9.3f} "
            f"{fast.bandwidth_hz[k] / 1e6:>7.3f} {fast.upload_time_s[k]:>8.3f} {fast.finish_time_s[k]:>8.3f}"
        )
    print()
    print(f"round latency, optimal split : {fast.latency_s:.4f} s")
    print(f"round latency, equal split   : {equal_latency:.4f} s  ({equal_latency / fast.latency_s:.2f}x)")
    for name, r in res.items():
        gap = abs(r.latency_s / fast.latency_s - 1) if r.success else float("nan")
        print(f"  backend {name:<6} {r.status.value:<9} τ = {r.latency_s:.9f} s  rel. diff {gap:.1e}  "
              f"solve {r.solve_time_s * 1e3:.2f} ms")
    big = llama_7b_qv(16)
    print(f"\nfor scale: Llama-2-7B q/v at r = 16 uploads {big.dense_payload_bits / 1e6:.1f} Mbit dense "
          f"({big.num_parameters / 1e6:.1f} M LoRA parameters)")
    return 0


def _run(args: argparse.Namespace) -> int:
    from fedloop import RunConfig
    from fedloop.checkpoint import RunFolderBusy
    from fedloop.data import TaskUnavailable
    from fedloop.loop import RunFailed, run

    try:
        cfg = RunConfig.from_toml(args.config)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    overrides = {k: v for k, v in (("rounds", args.rounds), ("out", args.out), ("seed", args.seed),
                                   ("strategy", args.strategy), ("device", args.device)) if v is not None}
    if overrides:
        cfg = cfg.replace(**overrides)
    callbacks = []
    if args.tensorboard is not None:
        from fedloop.callbacks import TensorBoardWriter

        try:
            callbacks.append(TensorBoardWriter(args.tensorboard or f"{cfg.out}/tensorboard"))
        except ImportError as exc:
            raise UserError(str(exc)) from None
    try:
        h = run(cfg, resume=args.resume, progress=not args.quiet, callbacks=callbacks)
    except (TaskUnavailable, RunFailed, RunFolderBusy, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"cannot write the run folder {cfg.out}: {exc.strerror or exc}") from None
    last = h.rounds[-1]
    acc = "" if last["accuracy"] != last["accuracy"] else f", accuracy {h.final_accuracy:.4f}"
    if last.get("perplexity", float("nan")) == last.get("perplexity"):
        acc += f", perplexity {last['perplexity']:.4g}"
    print(f"{cfg.strategy} on {cfg.task}: {len(h.rounds)} rounds, test loss {last['test_loss']:.4f}{acc}, "
          f"uplink {h.total_uplink_bits / 1e6:.2f} Mbit, simulated time {last['wallclock_s']:.2f} s "
          f"(τ̄ = {h.meta['latency_budget_s']:.3g} s); wrote {cfg.out}")
    return 0


def _design(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from fedloop import RunConfig
    from fedloop.checkpoint import RunFolderBusy, check_run_folder
    from fedloop.data import TaskUnavailable
    from fedloop.design import plan_for
    from fedloop.history import History, write_csv

    try:
        cfg = RunConfig.from_toml(args.config)
        pilot = History.load(args.pilot) if args.pilot else None
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    if args.out is not None:
        cfg = cfg.replace(out=args.out)
    check_run_folder(cfg.out)  # before the pilot and the plan, not after
    try:
        plan, pilot, calibration = plan_for(cfg, pilot=pilot, ranks=args.ranks, keep_ratios=args.keep_ratios,
                                          pilot_rounds=args.pilot_rounds, draws=args.draws, progress=not args.quiet)
    except (TaskUnavailable, RunFolderBusy, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
    print(plan.message)
    print(plan.format_table())
    if plan.online_table:
        print(plan.format_online_table())
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "plan.csv", plan.table_rows())
    if plan.online_table:
        write_csv(out / "plan_online.csv", plan.online_rows())
    (out / "plan.json").write_text(json.dumps({
        "status": plan.status.value, "message": plan.message, "rank": plan.rank, "keep": plan.keep,
        "keep_ratio": plan.keep_ratio, "rounds": plan.rounds, "relative_v": plan.relative_v,
        "weight_v": plan.weight_v,
        "predicted_loss": plan.predicted_loss, "latency_budget_s": plan.latency_budget_s,
        "binding": list(plan.binding), "calibration": calibration.to_dict()}, indent=1, default=float))
    print(f"wrote {out / 'plan.csv'}{', plan_online.csv' if plan.online_table else ''} and {out / 'plan.json'}")
    return 0 if plan.success else 1


def _allocate(args: argparse.Namespace) -> int:
    import json

    from tsfa.jsonio import allocate_json

    if args.input == "-":
        if sys.stdin is None or sys.stdin.closed:
            raise UserError("--input -: standard input is not open")
        text = sys.stdin.read()
    else:
        try:
            with open(args.input, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise UserError(f"cannot read --input {args.input}: {exc.strerror}") from None
    try:
        result = allocate_json(text)
    except (RecursionError, OverflowError) as exc:  # input beyond what the parser or the model can hold
        raise UserError(f"cannot process --input {args.input}: {type(exc).__name__}: {exc}") from None
    out = json.dumps(result, indent=args.indent, ensure_ascii=False)
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(out + "\n")
        except OSError as exc:
            raise UserError(f"cannot write --output {args.output}: {exc.strerror or exc}") from None
    else:
        print(out)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedloop.history import History
    from fedloop.plots import plot_run

    try:
        h = History.load(args.run_dir)
    except FileNotFoundError as exc:
        raise UserError(f"{exc} (is {args.run_dir} a run folder written by tsfa run?)") from None
    try:
        out = plot_run(h, args.out or Path(args.run_dir) / "run.png")
    except OSError as exc:
        raise UserError(f"cannot write the figure: {exc.strerror or exc}") from None
    print(f"wrote {out}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fedloop.checkpoint import check_run_folder
    from fedloop.plots import compare_runs

    check_run_folder(args.out)
    try:
        rows, path = compare_runs(args.run_dirs, args.out)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    metric = rows[0]["metric"].replace("_", " ")
    print(f"{'run':<24} {'strategy':>8} {'final ' + metric:>16} {'uplink Mbit':>12} {'sim time s':>10} "
          f"{'latency/τ̄':>10}")
    for r in rows:
        print(f"{r['run'][:24]:<24} {r['strategy']:>8} {r['final']:>16.4f} {r['uplink_mbit']:>12.2f} "
              f"{r['simulated_s']:>10.2f} {r['latency_over_budget']:>10.2f}")
    print(f"wrote {path}")
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from fedloop import RunConfig
    from fedloop.benchmark import benchmark
    from fedloop.checkpoint import RunFolderBusy, check_run_folder
    from fedloop.data import TaskUnavailable
    from fedloop.loop import RunFailed

    try:
        cfg = RunConfig.from_toml(args.config)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    if args.rounds is not None:
        cfg = cfg.replace(rounds=args.rounds)
    seeds = args.seeds if args.seeds is not None else (3 if args.quick else 5)
    if not 1 <= seeds <= 1000:
        raise UserError(f"--seeds must be in 1..1000; got {seeds}")
    check_run_folder(args.out)
    try:
        b = benchmark(cfg, args.strategies, seeds, out=args.out, delta=args.delta, progress=not args.quiet)
    except (TaskUnavailable, RunFailed, RunFolderBusy, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    print(b.format_table())
    print(f"wrote {b.out / 'summary.csv'}, summary.json, rounds.csv and benchmark.png")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as :class:`UserError` (one line, exit 2) instead of
    printing the usage and exiting."""

    def error(self, message):
        where = f"{self.prog.split(' ', 1)[1]}: " if " " in self.prog else ""  # the subcommand, if any
        raise UserError(f"{where}{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tsfa", description="Wireless federated LoRA fine-tuning solvers.")
    p.add_argument("--version", action="version", version=f"tsfa {__version__}")
    sub = p.add_subparsers(dest="command")
    m = sub.add_parser("demo", help="the main job on embedded defaults: offline design, then TSFA, fedit and "
                                    "ideal on rt-minilm, a table and figures (--quick: the linear task, seconds)")
    m.add_argument("--quick", action="store_true", help="the linear task instead of rt-minilm (seconds)")
    m.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    m.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.set_defaults(func=_demo)
    d = sub.add_parser("bandwidth-demo", help="one round's bandwidth split on the default cell, every backend")
    d.add_argument("--clients", type=int, default=20, help="number of clients (default 20)")
    d.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--local-steps", type=int, default=4)
    d.add_argument("--batch-size", type=int, default=16)
    d.set_defaults(func=_bandwidth_demo)
    r = sub.add_parser("run", help="run federated fine-tuning from a TOML config (fedloop.RunConfig fields)")
    r.add_argument("config", help="TOML file whose keys are RunConfig fields")
    r.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--rounds", type=int, help="override the number of rounds")
    r.add_argument("--seed", type=int, help="override the seed")
    r.add_argument("--strategy", help="override the strategy")
    r.add_argument("--out", help="override the run folder")
    r.add_argument("--device", help="override the device (auto, cpu, cuda, cuda:N)")
    r.add_argument("--tensorboard", nargs="?", const="", metavar="DIR",
                   help="write each round's ledger row for TensorBoard (default DIR: <run folder>/tensorboard)")
    r.set_defaults(func=_run)
    g = sub.add_parser("design", help="offline plan (rank, keep ratio, V) for a TOML config, from a calibrated bound")
    g.add_argument("config", help="TOML file whose keys are RunConfig fields")
    g.add_argument("--pilot", help="calibrate on this run folder instead of running a pilot")
    g.add_argument("--pilot-rounds", type=int, default=8, help="rounds of the pilot run (default 8)")
    g.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="candidate ranks")
    g.add_argument("--keep-ratios", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="candidate keep ratios")
    g.add_argument("--draws", type=int, default=200, help="channel draws of the latency SAA (default 200)")
    g.add_argument("--out", help="override the folder for plan.csv / plan.json (default: the config's out)")
    g.add_argument("--quiet", action="store_true", help="no progress bar for the pilot")
    g.set_defaults(func=_design)
    a = sub.add_parser("allocate", help="one round's allocation, JSON in and out (docs/allocate_json.md)")
    a.add_argument("--input", required=True, help="round JSON file, or - for standard input")
    a.add_argument("--output", help="write the allocation JSON here (default: standard output)")
    a.add_argument("--indent", type=int, default=1, help="JSON indent (default 1)")
    a.set_defaults(func=_allocate)
    pl = sub.add_parser("plot", help="figures of one run folder (metric vs rounds and bits, latency, queue)")
    pl.add_argument("run_dir")
    pl.add_argument("--out", help="PNG path (default RUN_DIR/run.png)")
    pl.set_defaults(func=_plot)
    c = sub.add_parser("compare", help="table and figure across run folders")
    c.add_argument("run_dirs", nargs="+")
    c.add_argument("--out", default="runs/compare_cli", help="folder for compare.png")
    c.set_defaults(func=_compare)
    b = sub.add_parser("benchmark", help="the comparison protocol: strategies paired by seed, mean ± 95 %% CI, "
                                         "bits- and time-to-target, a figure (fedloop.benchmark)")
    b.add_argument("config", help="TOML file whose keys are RunConfig fields (strategy and seed are set per run)")
    b.add_argument("--strategies", nargs="+", default=["ideal", "fedit", "head", "lowrank", "topk", "random", "tsfa"],
                   help="strategies to compare (default: ideal fedit head lowrank topk random tsfa)")
    b.add_argument("--seeds", type=int, help="number of paired seeds (default 5; 3 with --quick)")
    b.add_argument("--quick", action="store_true", help="3 seeds instead of 5")
    b.add_argument("--rounds", type=int, help="override the number of rounds")
    b.add_argument("--delta", type=float, help="tolerance of the target (default: 1 point of the task's metric)")
    b.add_argument("--out", default="runs/benchmark", help="benchmark folder (default runs/benchmark); "
                                                          "finished runs in it are reused")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_benchmark)
    return p


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 on success, and for bad input one line ``tsfa: error: ...`` on
    standard error and exit status 2."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UserError as exc:  # argparse's own complaints, as one line
        print(f"tsfa: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    if getattr(args, "func", None) is None:
        print("tsfa: error: a command is required (see tsfa --help)", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (UserError, ValueError) as exc:
        print(f"tsfa: error: {_one_line(exc)}", file=sys.stderr)
    except (OSError, OverflowError, RecursionError, MemoryError) as exc:  # beyond what the machine or files allow
        print(f"tsfa: error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
