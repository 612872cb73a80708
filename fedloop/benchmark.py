"""The comparison protocol: strategies paired by seed, mean ± 95 % CI, bits- and time-to-target.

``benchmark(config, strategies, seeds, out=...)`` runs every strategy on every seed from one
:class:`~fedloop.config.RunConfig`. Runs with the same seed share the client split, the
client positions and every round's channel draw, the minibatches and the test set (the loop
derives all randomness from (seed, round, client)), so differences between strategies are
paired. For each strategy it reports, over seeds, the mean and a Student-t 95 % confidence
interval of:

* ``final``: the task's metric (:data:`METRICS`) at the last round;
* ``bits_to_target``: the cumulative uplink bits at the first round whose metric reaches the
  target, the better dense reference's (``ideal`` or ``fedit``) mean final metric less δ
  (1 point by default); runs that never reach it are counted and reported as not reached;
* ``time_to_target``: the simulated wall-clock at that round; ``downlink_to_target``: the
  cumulative downlink bits at that round;
* ``uplink_bits``, ``downlink_bits`` (totals), ``latency_over_budget`` (mean round latency / τ̄);
* ``at_equal_bits`` / ``at_equal_time``: the metric after the last round that fits in a
  common uplink budget and a common simulated time (the smallest totals among strategies
  that send an adapter; ``head`` does not), the initial metric when no round fits;
* ``paired_difference``: final metric minus the reference strategy's on the same seed.

Runs live in ``out/<strategy>/seed<k>``; a finished run whose saved config equals the
requested one is reused, an interrupted one resumes from its checkpoint. The summary goes to
``summary.csv``/``summary.json``, every round of every run to ``rounds.csv``, and the figure
(metric against rounds, uplink bits and simulated time, with CI bands) to ``benchmark.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedloop.checkpoint import CHECKPOINT
from fedloop.config import RunConfig
from fedloop.history import History, write_csv

__all__ = ["Metric", "METRICS", "DEFAULT_STRATEGIES", "Benchmark", "benchmark", "mean_ci", "first_reach",
           "metric_within", "summarise"]

#: The strategies every comparison includes by default: the dense references, the two baselines
#: that could embarrass a compressor (frozen adapter, a smaller dense rank at the same bits),
#: element-wise top-k, random components and TSFA.
DEFAULT_STRATEGIES = ("ideal", "fedit", "head", "lowrank", "topk", "random", "tsfa")


@dataclass(frozen=True)
class Metric:
    """A task's headline metric: the ledger column, its direction and the tolerance δ of the
    target (absolute, or a fraction of the reference when ``relative``)."""

    column: str
    higher_is_better: bool
    delta: float = 0.01
    relative: bool = False

    def target(self, reference: float, delta: float | None = None) -> float:
        d = self.delta if delta is None else float(delta)
        d = d * abs(reference) if self.relative else d
        return reference - d if self.higher_is_better else reference + d

    def reaches(self, values: np.ndarray, target: float) -> np.ndarray:
        return values >= target if self.higher_is_better else values <= target

    def best(self, values) -> float:
        return float(np.max(values) if self.higher_is_better else np.min(values))


#: rt-minilm: test accuracy (1 point = 0.01); rt-distill: the distillation test loss, the share of
#: the teacher's change still missing (1 point = 0.01); linear: test loss (δ = 1 % of the reference);
#: hf-classification: test accuracy; hf-causal-lm (and registered tasks): test loss, the mean token
#: cross-entropy for a causal LM, log perplexity (δ = 1 % of the reference).
METRICS = {"rt-minilm": Metric("accuracy", True, 0.01), "rt-distill": Metric("test_loss", False, 0.01),
           "linear": Metric("test_loss", False, 0.01, relative=True),
           "hf-classification": Metric("accuracy", True, 0.01),
           "hf-causal-lm": Metric("test_loss", False, 0.01, relative=True)}
#: The metric of a task not in :data:`METRICS` (one added with ``fedloop.register_task``).
DEFAULT_METRIC = Metric("test_loss", False, 0.01, relative=True)


def mean_ci(values, level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its Student-t confidence interval (NaN half-width for n < 2)."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1:
        return float(x[0]), math.nan
    half = stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(half)


def _series(h: History, metric: Metric) -> tuple[np.ndarray, ...]:
    """Per evaluated round: the metric, cumulative uplink bits, cumulative simulated time, round,
    cumulative downlink bits."""
    y = h.column(metric.column)
    bits = np.cumsum(h.column("uplink_bits"))
    time_s = h.column("wallclock_s")
    rounds = h.column("round")
    down = np.cumsum(h.column("downlink_bits"))
    ok = np.isfinite(y)
    return y[ok], bits[ok], time_s[ok], rounds[ok], down[ok]


def first_reach(h: History, metric: Metric, target: float) -> dict:
    """The first evaluated round whose metric reaches ``target``: {round, uplink_bits,
    wallclock_s, downlink_bits} (cumulative up to that round), or None values when the run
    never reaches it."""
    y, bits, time_s, rounds, down = _series(h, metric)
    hit = np.flatnonzero(metric.reaches(y, target))
    if hit.size == 0:
        return {"round": None, "uplink_bits": None, "wallclock_s": None, "downlink_bits": None}
    i = int(hit[0])
    return {"round": int(rounds[i]), "uplink_bits": float(bits[i]), "wallclock_s": float(time_s[i]),
            "downlink_bits": float(down[i])}


def metric_within(h: History, metric: Metric, column: str, budget: float) -> float:
    """The metric after the last evaluated round whose cumulative ``column`` ("uplink_bits" or
    "wallclock_s") is within ``budget``; the initial metric when no round fits."""
    y, bits, time_s, _, _ = _series(h, metric)
    x = bits if column == "uplink_bits" else time_s
    fits = np.flatnonzero(x <= budget * (1 + 1e-12))
    if fits.size:
        return float(y[fits[-1]])
    return float(h.meta.get(f"initial_{metric.column}", math.nan))


@dataclass
class Benchmark:
    """What :func:`benchmark` measured: the runs, one summary row per strategy, the settings."""

    config: dict
    metric: Metric
    strategies: tuple
    seeds: tuple
    reference: str | None
    target: float
    equal_bits: float
    equal_time_s: float
    summary: list
    runs: dict = field(repr=False, default_factory=dict)
    out: Path | None = None

    def row(self, strategy: str) -> dict:
        return next(r for r in self.summary if r["strategy"] == strategy)

    def format_table(self) -> str:
        m = self.metric.column.replace("_", " ")
        head = (f"{'strategy':<8} {'final ' + m:>19} {'Δ vs ' + str(self.reference):>17} {'bits-to-target Mbit':>22} "
                f"{'downlink-to-target Mbit':>24} {'time-to-target s':>18} {'uplink Mbit':>12} {'downlink Mbit':>13} "
                f"{'lat/τ̄':>6} {'@equal bits':>12} {'@equal time':>12}")
        lines = [head]
        for r in self.summary:
            lines.append(
                f"{r['strategy']:<8} {_pm(r['final_mean'], r['final_ci'], 4):>19} "
                f"{_pm(r['paired_difference_mean'], r['paired_difference_ci'], 4):>17} "
                f"{_reach(r, 'bits_to_target_mean', 'bits_to_target_ci', 1e-6):>22} "
                f"{_reach(r, 'downlink_to_target_mean', 'downlink_to_target_ci', 1e-6):>24} "
                f"{_reach(r, 'time_to_target_mean', 'time_to_target_ci', 1.0):>18} "
                f"{r['uplink_bits_mean'] / 1e6:>12.1f} {r['downlink_bits_mean'] / 1e6:>13.1f} "
                f"{r['latency_over_budget_mean']:>6.2f} {r['at_equal_bits_mean']:>12.4f} "
                f"{r['at_equal_time_mean']:>12.4f}")
        lines.append(f"target: {m} {'≥' if self.metric.higher_is_better else '≤'} {self.target:.4f} "
                     f"(the better dense reference, {self.reference}, less δ); equal bits "
                     f"{self.equal_bits / 1e6:.1f} Mbit, equal time {self.equal_time_s:.2f} s; "
                     f"{len(self.seeds)} paired seeds, 95 % CI")
        return "\n".join(lines)


def _pm(mean, ci, digits) -> str:
    if mean is None or not np.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f} ± {ci:.{digits}f}" if ci is not None and np.isfinite(ci) else f"{mean:.{digits}f}"


def _reach(r, key, ci_key, scale) -> str:
    n, reached = r["seeds"], r["reached"]
    if reached == 0:
        return "not reached"
    text = _pm(r[key] * scale, r[ci_key] * scale if r[ci_key] is not None else None, 1)
    return text if reached == n else f"{text} ({reached}/{n})"


def summarise(runs: dict, metric: Metric, strategies, seeds, *, delta: float | None = None,
              references=("ideal", "fedit")) -> dict:
    """The protocol's numbers from finished runs ``{(strategy, seed): History}`` (see the module
    docstring). Returns {reference, target, equal_bits, equal_time_s, summary rows}."""
    final = {key: _series(h, metric)[0][-1] if len(_series(h, metric)[0]) else math.nan
             for key, h in runs.items()}
    means = {s: float(np.nanmean([final[(s, k)] for k in seeds])) for s in strategies}
    present = [s for s in references if s in strategies]
    reference = None
    if present:
        reference = present[0]
        for s in present[1:]:
            if metric.best([means[s], means[reference]]) == means[s] and means[s] != means[reference]:
                reference = s
    target = metric.target(means[reference], delta) if reference else math.nan
    totals_bits = {s: np.mean([runs[(s, k)].total_uplink_bits for k in seeds]) for s in strategies}
    senders = [s for s in strategies if s != "head" and totals_bits[s] > 0] or list(strategies)
    equal_bits = float(min(totals_bits[s] for s in senders))
    equal_time = float(min(np.mean([runs[(s, k)].rounds[-1]["wallclock_s"] for k in seeds]) for s in senders))
    rows = []
    for s in strategies:
        per = []
        for k in seeds:
            h = runs[(s, k)]
            hit = first_reach(h, metric, target) if reference else {"uplink_bits": None, "wallclock_s": None,
                                                                    "downlink_bits": None}
            lat = h.column("latency_s")
            per.append({"final": final[(s, k)], "bits": hit["uplink_bits"], "time": hit["wallclock_s"],
                        "down_bits": hit["downlink_bits"],
                        "uplink": h.total_uplink_bits, "downlink": float(np.sum(h.column("downlink_bits"))),
                        "lat": float(np.mean(lat) / h.meta["latency_budget_s"]),
                        "eq_bits": metric_within(h, metric, "uplink_bits", equal_bits),
                        "eq_time": metric_within(h, metric, "wallclock_s", equal_time),
                        "diff": final[(s, k)] - final[(reference, k)] if reference else math.nan})
        row = {"strategy": s, "seeds": len(seeds), "reached": sum(p["bits"] is not None for p in per)}
        for name, key in (("final", "final"), ("bits_to_target", "bits"), ("time_to_target", "time"),
                          ("downlink_to_target", "down_bits"),
                          ("uplink_bits", "uplink"), ("downlink_bits", "downlink"),
                          ("latency_over_budget", "lat"), ("at_equal_bits", "eq_bits"),
                          ("at_equal_time", "eq_time"), ("paired_difference", "diff")):
            row[f"{name}_mean"], row[f"{name}_ci"] = mean_ci([p[key] for p in per])
        rows.append(row)
    return {"reference": reference, "target": target, "equal_bits": equal_bits, "equal_time_s": equal_time,
            "summary": rows}


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}


def _run_or_reuse(cfg: RunConfig, progress: bool) -> History:
    """A finished run with the same config (wherever its folder was) is reused; an interrupted
    one resumes from its checkpoint."""
    from fedloop.loop import run

    folder = Path(cfg.out)
    if (folder / "history.json").is_file():
        h = History.load(folder)
        # a ledger written before a setting existed ran with that setting's default
        saved = {**_FIELD_DEFAULTS, **h.config}
        same = {k: v for k, v in saved.items() if k != "out"} == {k: v for k, v in cfg.to_dict().items()
                                                                  if k != "out"}
        if same and len(h.rounds) == cfg.rounds:
            return h
    if (folder / CHECKPOINT).is_file():
        return run(cfg, resume=True, progress=progress)
    return run(cfg, progress=progress)


def benchmark(config: RunConfig, strategies=DEFAULT_STRATEGIES, seeds=5, *, out="runs/benchmark",
              delta: float | None = None, metric: Metric | None = None, progress: bool = True,
              variants: dict | None = None) -> Benchmark:
    """Run the comparison protocol (module docstring) and write its files into ``out``.

    Args:
        config: the shared settings; ``strategy``, ``seed`` and ``out`` are set per run.
        strategies: strategy names (``fedloop.STRATEGIES``) or labels of ``variants``, in the
            order to report them.
        variants: label → config changes (with ``strategy``), e.g. ``{"tsfa+ef": {"strategy":
            "tsfa", "error_feedback": "rotated"}}``: one strategy under other settings, run
            and reported like a strategy (its runs live in ``out/<label>``).
        seeds: a number of seeds (0..n-1) or the seeds themselves; ≥ 2 for a CI.
        out: the benchmark folder.
        delta: the target's tolerance (default: the metric's, 1 point).
        metric: override the task's :data:`METRICS` entry.
        progress: a tqdm bar over runs (and each run's own bar).
    """
    from tqdm.auto import tqdm

    from fedloop.config import STRATEGIES

    strategies = tuple(strategies)
    variants = dict(variants or {})
    for label, changes in variants.items():
        if not isinstance(label, str) or not label or "/" in label or label in STRATEGIES \
                or not isinstance(changes, dict) or changes.get("strategy") not in STRATEGIES:
            raise ValueError(f"variants must map a new label (no '/') to config changes with a strategy from "
                             f"{STRATEGIES}; got {label!r}: {changes!r:.80}")
        config.replace(**changes)  # validated now, not after hours of runs
    known = STRATEGIES + tuple(variants)
    if not strategies or any(s not in known for s in strategies) or len(set(strategies)) != len(strategies):
        raise ValueError(f"strategies must be distinct names from {known}; got strategies = {strategies}")
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1; got seeds = {seeds}")
        seeds = tuple(range(int(seeds)))
    seeds = tuple(int(k) for k in seeds)
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds must be distinct integers >= 0; got seeds = {seeds}")
    if delta is not None and (not np.isfinite(delta) or delta < 0):
        raise ValueError(f"delta must be a finite number >= 0; got delta = {delta}")
    metric = metric or METRICS.get(config.task, DEFAULT_METRIC)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    jobs = [(s, k) for s in strategies for k in seeds]
    bar = tqdm(jobs, desc=f"benchmark {config.task}", unit="run", disable=not progress)
    for s, k in bar:
        bar.set_postfix(strategy=s, seed=k)
        cfg = config.replace(**{"strategy": s, **variants.get(s, {})}, seed=k, out=str(out / s / f"seed{k}"))
        runs[(s, k)] = _run_or_reuse(cfg, progress=False)
    bar.close()
    result = summarise(runs, metric, strategies, seeds, delta=delta)
    bench = Benchmark(config=config.to_dict(), metric=metric, strategies=strategies, seeds=seeds, runs=runs,
                      out=out, **result)
    _write(bench)
    plot_benchmark(bench, out / "benchmark.png")
    return bench


def _write(b: Benchmark) -> None:
    write_csv(b.out / "summary.csv", b.summary)
    rows = []
    for (s, k), h in b.runs.items():
        for r in h.rounds:
            rows.append({"strategy": s, "seed": k, **{c: v for c, v in r.items() if not isinstance(v, list)}})
    write_csv(b.out / "rounds.csv", rows)
    clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
    (b.out / "summary.json").write_text(json.dumps({
        "config": b.config, "metric": {"column": b.metric.column, "higher_is_better": b.metric.higher_is_better,
                                       "delta": b.metric.delta, "relative": b.metric.relative},
        "strategies": list(b.strategies), "seeds": list(b.seeds), "reference": b.reference,
        "target": clean(b.target), "equal_bits": b.equal_bits, "equal_time_s": b.equal_time_s,
        "summary": [{k: clean(v) for k, v in r.items()} for r in b.summary]}, indent=1))


def plot_benchmark(b: Benchmark, path) -> Path:
    """The metric against rounds, cumulative uplink bits, cumulative uplink + downlink bits and
    simulated time: the mean over seeds with a 95 % CI band per strategy (x for bits and time:
    their mean over seeds at each round)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = b.metric.column.replace("_", " ")
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.8), sharey=True)
    for i, s in enumerate(b.strategies):
        ys, xs_bits, xs_both, xs_time, xs_round = [], [], [], [], None
        for k in b.seeds:
            y, bits, time_s, rounds, down = _series(b.runs[(s, k)], b.metric)
            ys.append(y)
            xs_bits.append(bits / 1e6)
            xs_both.append((bits + down) / 1e6)
            xs_time.append(time_s)
            xs_round = rounds
        n = min(len(y) for y in ys)
        Y = np.array([y[:n] for y in ys])
        stats = [mean_ci(Y[:, j]) for j in range(n)]
        mean = np.array([m for m, _ in stats])
        half = np.nan_to_num(np.array([c for _, c in stats]))
        color, style = f"C{i % 10}", ("-", "--", ":")[(i // 10) % 3]  # beyond 10 entries: dashed
        bits = np.mean([x[:n] for x in xs_bits], 0)
        both = np.mean([x[:n] for x in xs_both], 0)
        silent = not np.any(bits > 0)  # head on a task without a head: nothing to place on the bits axis
        for ax, x in zip(axes, (xs_round[:n], bits, both, np.mean([x[:n] for x in xs_time], 0)), strict=True):
            if (silent and ax is axes[1]) or (ax is axes[2] and not np.any(both > 0)):
                continue
            ax.plot(x, mean, color=color, ls=style, label=s if not silent else f"{s} (0 uplink bits)", lw=1.6)
            ax.fill_between(x, mean - half, mean + half, color=color, alpha=0.18, lw=0)
    if np.isfinite(b.target):
        for ax in axes:
            ax.axhline(b.target, color="k", ls=":", lw=1)
    axes[0].set(xlabel="round", ylabel=f"test {label}" if "loss" not in label else label)
    axes[1].set(xlabel="cumulative uplink (Mbit, mean over seeds; log scale)")
    axes[1].set_xscale("log")
    axes[2].set(xlabel="cumulative uplink + downlink (Mbit, mean over seeds; log scale)")
    axes[2].set_xscale("log")
    axes[3].set(xlabel="simulated wall-clock (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[3].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))  # outside the curves
    target = f"; dotted: target ({b.reference} less δ)" if b.reference is not None else " (no dense reference run)"
    fig.suptitle(f"{b.config['task']}: {len(b.seeds)} paired seeds, mean ± 95 % CI{target}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
