"""The server of a federated LoRA run: the system, the policy, the global adapter, the ledger.

One round (:meth:`Server.step`), against a client pool (:mod:`fedloop.client`):

1. **train**: the clients train E local steps from the global factors and head and report
   their error profiles e_k(s);
2. **allocate**: this round's channel is drawn (Rayleigh fading on fixed client positions)
   and the strategy's policy chooses keep counts and bandwidth (``tsfa``: TSFA's
   :class:`~tsfa.OnlineAllocator` on profiles relative to the round's mean dense energy);
3. **deadlines**: skipped clients and clients that miss the deadline are left out;
4. **upload and aggregate**: the scheduled clients upload; the server reads each payload
   (a bad one drops its client), aggregates with the data weights, averages the head and
   re-orthogonalises the global factors (SOFT strategies);
5. **record**: the queue sees the round's latency; evaluation, measurements for the bound
   (:mod:`fedloop.measure`) and the ledger rows.

Every random draw comes from (seed, purpose, round, client), so a resumed run repeats an
uninterrupted one exactly and every strategy sees the same channels and batches for a seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import soft
from fedloop import measure
from fedloop.checkpoint import CHECKPOINT, CheckpointError, load_checkpoint, save_checkpoint
from fedloop.client import RunFailed, TrainReport, Upload, to_host
from fedloop.config import RunConfig
from fedloop.history import History
from fedloop.strategies import derive_rng, derive_seed, read_wire, wire_bytes
from fedloop.strategies import get as get_strategy
from fedloop.tasks import make_task
from soft.baselines import ffa_bits
from soft.feedback import basis_change, rotate_residuals
from tsfa import Cell, OnlineAllocator, min_latency_bandwidth
from tsfa.model import LoraShape
from tsfa.simulate import dense_latency_s

__all__ = ["Server", "Decision", "DOWNLINK_RATE_BPS"]

#: Broadcast rate of the global adapter, bit/s (the downlink is not the bottleneck studied).
DOWNLINK_RATE_BPS = 100e6


class Decision(NamedTuple):
    """The round's allocation: keep counts, bandwidth [Hz], upload times [s], latency [s]."""

    keep: np.ndarray
    bandwidth_hz: np.ndarray
    upload_s: np.ndarray
    latency_s: float
    fallback: str
    solve_time_s: float
    value_bits: np.ndarray | None = None  # q_k where the allocator chose it (value_bits = "auto")


def apply_broadcast(strategy, view: dict, data: bytes, shape: LoraShape) -> dict:
    """The clients' view of the adapter after a compressed broadcast ``data`` (what
    :meth:`Server.broadcast` sends): ``flasc``'s top-k entries added, or SOFT's payload applied.
    The server and every client (in process or a Flower node) compute it with this function."""
    if strategy.downlink == "topk":
        from soft.baselines import decode_topk

        inc = decode_topk(data, shape)
        return {n: (A + da.to(A.dtype), B + db.to(B.dtype))
                for (n, (A, B)), da, db in zip(view.items(), inc.delta_a, inc.delta_b, strict=True)}
    return read_wire(data, shape).apply_to(view)


class Server:
    """The server of one run (module docstring): ``Server(config)``, then ``step(pool)`` per round.

    Attributes: ``config``; the system (``task``, ``shape`` (the allocator's payload shape:
    SOFT's header plus the head's bits), ``soft_shape`` (the adapter's), ``cell``,
    ``clients``, ``compute_s``, ``weights`` p_k, ``tau_bar``); ``strategy`` and ``policy``;
    the state (``global_factors``, ``global_head``, ``folded``, ``round``, ``wallclock``,
    ``history``)."""

    def __init__(self, config: RunConfig):
        cfg = self.config = config
        self._prediction: tuple = (None, None)  # (rounds it was fitted on, convergence Calibration)
        self.strategy = get_strategy(cfg.strategy)
        self.task = make_task(cfg)
        self.weights = self.task.client_sizes / self.task.client_sizes.sum()
        live = self.task.factors()
        self.names = list(live)
        self.head_bits = 32 * sum(p.numel() for p in self.task.head().values())
        base = self.soft_shape = self.task.lora_shape()
        # The allocator's payload includes the dense head: header H + head bits.
        self.shape = LoraShape(base.modules, base.rank, cfg.base_value_bits, base.header_bits + self.head_bits)
        self.cell = Cell(total_bandwidth_hz=cfg.bandwidth_hz)
        self.clients = self.cell.sample_clients(cfg.clients, rng=derive_rng(cfg.seed, 11))
        self.compute_s = self.clients.compute_time_s(cfg.local_steps * cfg.batch_size * self.task.flops_per_sample)
        # τ̄ is the system's: the dense latency of the configured rank r, the same for every strategy
        # (``lowrank`` builds a smaller adapter, ``head`` sends no adapter, both under the same τ̄).
        nominal = base.with_rank(cfg.rank)
        self.dense_median_s = dense_latency_s(self.cell, self.clients, LoraShape(
            nominal.modules, nominal.rank, nominal.bits_per_value, self.shape.header_bits), self.compute_s,
            downlink_s=nominal.downlink_bits / DOWNLINK_RATE_BPS, rng=derive_rng(cfg.seed, 12))
        self.tau_bar = cfg.latency_budget_s or cfg.budget_factor * self.dense_median_s
        # What one client receives per round: the global adapter and head (``head``: the head only).
        adapter_bits = 0 if cfg.strategy == "head" else base.downlink_bits
        self.broadcast_bits = self.head_bits + adapter_bits
        self.downlink_s = (adapter_bits or self.head_bits) / DOWNLINK_RATE_BPS
        self.policy = None if self.strategy.policy is None else self.strategy.policy(
            self.shape, config=cfg, latency_budget_s=self.tau_bar,
            max_latency_s=None if cfg.cap_factor is None else cfg.cap_factor * self.tau_bar,
            total_bandwidth_hz=cfg.bandwidth_hz, downlink_s=self.downlink_s)
        start = to_host(live)  # the server's state: float32 on the CPU, wherever the model lives
        self.global_factors = soft.reorthogonalize_factors(start) if cfg.resolved_reorthogonalize else start
        self.global_head = to_host(self.task.head())
        self.folded = {n: None for n in self.names}  # Σ of deltas folded into frozen weights (ideal, svd)
        # error feedback: the in-process clients' residuals (what each did not send), checkpointed with the run
        self.residuals: list = [None] * cfg.clients
        self.basis: dict | None = None  # the last round's change of basis {module: (M, M⁻¹)} (rotated feedback)
        # a compressed downlink (flasc, or downlink_value_bits): what the clients hold, which lags the
        # global adapter (``broadcast``)
        self.view = soft.clone_factors(self.global_factors) if cfg.compressed_downlink else None
        self.last_broadcast: bytes | None = None  # the last compressed broadcast's bytes (in this process)
        self.history = History(config=cfg.to_dict())
        self.history.meta.update(latency_budget_s=self.tau_bar, dense_median_latency_s=self.dense_median_s,
                                 downlink_s=self.downlink_s, head_bits=self.head_bits,
                                 lora_parameters=base.num_parameters,
                                 model_parameters=int(sum(p.numel() for p in self.task.model.parameters())),
                                 payload_bits_dense=self.shape.dense_payload_bits)
        self.round, self.wallclock = 0, 0.0

    def evaluate_start(self) -> None:
        """Evaluate the start point θ_0 into ``history.meta`` (the bound's curves start there)."""
        self.task.assign(self.global_factors, self.global_head)
        self.history.meta["initial_test_loss"], self.history.meta["initial_accuracy"] = self.task.evaluate()
        if hasattr(self.task, "objective"):
            self.history.meta["initial_objective"] = self.task.objective(self.weights)[0]

    # -- one round -------------------------------------------------------------------------------
    def step(self, pool) -> dict:
        """One round against ``pool`` (module docstring); returns the round's ledger row."""
        t, K = self.round, self.config.clients
        start = measure.start_point(self.task, self.global_factors, self.weights)
        report = self.check_report(pool.train(t))
        profiles, status = np.asarray(report.profiles, dtype=float), list(report.status)
        ok = [k for k in range(K) if status[k] == "ok"]
        snr = self.cell.sample_snr_hz(self.clients, rng=derive_rng(self.config.seed, 31, t))
        decision = self.allocate(snr, profiles, ok, report.rounding)
        sent, latency = self.apply_deadlines(decision, status)
        folded_before = {n: None if v is None else v.clone() for n, v in self.folded.items()}
        bits, sent = self.receive(pool, t, sent, decision, status)
        local = getattr(pool, "local_factors", None)
        if local is not None:  # the clients' full factors are here: what aggregation lost
            start.update(measure.aggregation_losses(self, ok, local, folded_before, pool.probes))
        # what each client received at the round's start: a Flower pool counts the bytes it sent
        received = getattr(pool, "broadcast_bits", None)
        broadcast_now = self.broadcast_bits + self.basis_bits if received is None else received
        if self.config.resolved_reorthogonalize:  # SOFT: near-orthogonal factors again, B·A unchanged
            before = self.global_factors
            self.global_factors = soft.reorthogonalize_factors(before)
            if self.rotates:  # the clients' residuals follow the change of basis, broadcast next round
                self.basis = basis_change(before, self.global_factors)
                self.residuals = rotate_residuals(self.residuals, before, self.global_factors, self.basis)
        queue_before = self.policy.queue if isinstance(self.policy, OnlineAllocator) else math.nan
        if isinstance(self.policy, OnlineAllocator):
            self.policy.observe(latency)
        self.wallclock += latency
        row = self.record(t, report, decision, status, sent, bits, snr, latency, queue_before, start, broadcast_now)
        if self.view is not None:
            self.broadcast()
        self.round += 1
        return row

    @property
    def rotates(self) -> bool:
        """The clients' error-feedback residuals follow the re-orthogonalisation's change of basis."""
        return self.config.error_feedback == "rotated" and self.config.resolved_reorthogonalize

    @property
    def basis_bits(self) -> int:
        """Downlink bits of the last change of basis, which rotated error feedback broadcasts with
        the adapter after the first round: M per module, r × r float64 values (M⁻¹ the clients
        compute)."""
        if not self.rotates or self.round == 0:
            return 0
        return 64 * sum(A.shape[0] ** 2 for A, _ in self.global_factors.values())

    @property
    def client_factors(self) -> dict:
        """The adapter the clients hold and train from: the global one, or their lagging view of
        it under a compressed downlink (``flasc``, ``downlink_value_bits``)."""
        return self.global_factors if self.view is None else self.view

    def broadcast(self) -> None:
        """The compressed downlink, after round ``self.round``: a payload of (global − view), which
        the clients (and the server's copy of their view) add (:func:`apply_broadcast`); what it
        does not carry stays in the difference for later rounds. ``flasc``: the largest entries
        at the uplink's bit budget (``soft.baselines.topk_elementwise`` with ``keep``);
        ``downlink_value_bits`` q: SOFT's payload of the ``downlink_keep`` components (all r by
        default) whose change is largest, at q bits a value, rounded with a generator seeded
        from (seed, 44, round). Keeps the bytes (``last_broadcast``) and sets the next round's
        broadcast bits (8 × their length, plus the head) and downlink time."""
        from soft.baselines import topk_elementwise

        cfg = self.config
        if self.strategy.downlink == "topk":
            data = topk_elementwise(self.view, self.global_factors, cfg.keep,
                                    bits_per_value=cfg.base_value_bits).encode()
        else:
            data = wire_bytes(self.view, self.global_factors, cfg.downlink_keep or self.soft_shape.rank,
                              cfg.downlink_value_bits, rounding_seed=derive_seed(cfg.seed, 44, self.round))
        self.view = apply_broadcast(self.strategy, self.view, data, self.soft_shape)
        self.last_broadcast = data
        self.set_broadcast(8 * len(data))

    def set_broadcast(self, adapter_bits: int) -> None:
        """The next round's broadcast: ``adapter_bits`` plus the head, and its downlink time."""
        self.broadcast_bits = self.head_bits + int(adapter_bits)
        self.downlink_s = (int(adapter_bits) or self.head_bits) / DOWNLINK_RATE_BPS
        if self.policy is not None:
            self.policy.downlink_s = self.downlink_s

    def allocate(self, snr_hz: np.ndarray, profiles: np.ndarray, ok: list, rounding=None) -> Decision:
        """The strategy's policy on this round's channel; a client that did not train reports a
        zero profile (keep 0 allowed). ``rounding``: the clients' rounding profiles where the
        allocator chooses the precision (``value_bits = "auto"``)."""
        t0 = time.perf_counter()
        K, r = self.config.clients, self.shape.rank
        if self.policy is None:  # ffa, head: every client that trained sends its whole payload
            lora_bits = ffa_bits(self.global_factors) if self.strategy.train_b else 0
            bw = min_latency_bandwidth(np.full(K, lora_bits + self.head_bits), snr_hz, self.compute_s,
                                       self.config.bandwidth_hz, downlink_s=self.downlink_s)
            upload = np.nan_to_num(bw.upload_time_s)
            # a client with nothing to upload still computes: the round lasts until the last one is done
            latency = max(bw.latency_s, float(np.max(self.downlink_s + self.compute_s[ok] + upload[ok]))) if ok \
                else bw.latency_s
            return Decision(keep=np.full(K, r if lora_bits else 0), bandwidth_hz=bw.bandwidth_hz, upload_s=upload,
                            latency_s=latency, fallback="", solve_time_s=time.perf_counter() - t0)
        scale = float(np.sum(self.weights[ok] * profiles[ok, 0])) if ok else 0.0
        scale = scale if scale > 0 else 1.0
        menu = self.config.value_bits_menu
        extra = {"rounding_profile": rounding / scale} if menu else {}
        alloc = self.policy.step(snr_hz, self.compute_s, profiles / scale, self.weights, **extra)
        return Decision(keep=np.array(alloc.keep), bandwidth_hz=np.array(alloc.bandwidth_hz),
                        upload_s=np.array(alloc.upload_time_s), latency_s=alloc.latency_s, fallback=alloc.fallback,
                        solve_time_s=time.perf_counter() - t0,
                        value_bits=np.array(alloc.value_bits) if menu else None)

    def apply_deadlines(self, decision: Decision, status: list) -> tuple[list, float]:
        """The clients to upload: trained, allocated (keep > 0 under a policy) and in time for
        the deadline factor × τ̄; marks the others in ``status``. Returns (sent, latency)."""
        finish = self.downlink_s + self.compute_s + decision.upload_s
        factor = self.config.deadline_factor
        deadline = None if factor is None else factor * self.tau_bar
        sent = []
        for k, state in enumerate(status):
            if state != "ok":
                continue
            if decision.keep[k] == 0 and self.policy is not None:
                status[k] = "skipped"
            elif deadline is not None and finish[k] > deadline:
                status[k] = "deadline"
            else:
                sent.append(k)
        late = deadline is not None and "deadline" in status
        return sent, deadline if late else decision.latency_s

    def receive(self, pool, t: int, sent: list, decision: Decision, status: list) -> tuple[np.ndarray, list]:
        """Uplink and aggregation: the scheduled clients upload; a client that does not deliver
        (no reply, an error) is dropped with ``error: <reason>`` in ``status``, one whose upload
        fails validation (:meth:`check_upload`, the norm rule) with ``rejected: <reason>``; the
        others' updates and heads are averaged with the data weights. Returns (bits per client,
        the clients aggregated)."""
        bits = np.zeros(self.config.clients, dtype=np.int64)
        if not sent:
            uploads = {}
        else:
            chosen = {} if decision.value_bits is None else \
                {"value_bits": {k: int(decision.value_bits[k]) for k in sent}}
            uploads = pool.upload(t, list(sent), {k: int(decision.keep[k]) for k in sent},
                                  {k: float(decision.bandwidth_hz[k]) for k in sent}, **chosen)
        got, decoded = [], []
        for k in sent:
            up = uploads.get(k, "no reply") if isinstance(uploads, dict) else "the pool's uploads are not a mapping"
            if not isinstance(up, (str, Upload)):
                up = f"the pool returned {type(up).__name__}, not an Upload"
            if isinstance(up, str):
                status[k] = f"error: {up}"[:200]
                continue
            try:
                if decision.value_bits is not None:  # the payload must carry the precision allocated
                    s, q = int(decision.keep[k]), int(decision.value_bits[k])
                    need = dataclasses.replace(self.soft_shape, bits_per_value=q).payload_bits(s)
                    if up.bits != need:
                        raise ValueError(f"the payload has {up.bits!r:.20} bits; keep {s} at {q} bits per value "
                                         f"is {need} bits")
                decoded.append(self.check_upload(up, int(decision.keep[k])))
            except ValueError as exc:  # WireFormatError is a ValueError
                status[k] = f"rejected: {exc}"[:200]
                continue
            got.append(k)
            bits[k] = up.bits + self.head_bits
        got, decoded = self.reject_outliers(got, decoded, status, bits)
        if got:
            try:
                self.strategy.aggregate(self, decoded, self.weights[got])
            except ValueError as exc:  # e.g. valid updates whose sum overflows: stop, the checkpoint stays
                raise RunFailed(f"round {t + 1}: aggregation failed: {exc}; the last checkpoint is kept") from None
            w = self.weights[got] / self.weights[got].sum()
            self.global_head = {n: sum(wk * uploads[k].head[n] for wk, k in zip(w, got, strict=True))
                                for n in self.global_head}
        return bits, got

    def check_report(self, report) -> TrainReport:
        """A pool's :class:`~fedloop.client.TrainReport`, checked: profiles (K, r+1) finite and
        ≥ 0, losses (K,) numbers, status K strings; anything else is a ValueError naming it."""
        K, r = self.config.clients, self.shape.rank
        if not isinstance(report, tuple) or len(report) not in (3, 4):
            raise ValueError(f"pool.train must return a TrainReport (profiles, losses, status); got {report!r:.60}")
        profiles, losses, status = report[:3]
        menu = self.config.value_bits_menu
        rounding = None
        if menu:  # the allocator prices each precision by the rounding error the clients report
            try:
                rounding = np.asarray(report[3] if len(report) == 4 else None, dtype=float)
            except (TypeError, ValueError):
                raise ValueError("pool.train: rounding profiles must be numbers") from None
            if rounding.shape != (K, r + 1, len(menu)) or not np.all(np.isfinite(rounding)) or np.any(rounding < 0):
                raise ValueError(f"pool.train: rounding must be a finite, non-negative ({K}, {r + 1}, {len(menu)}) "
                                 f"array with value_bits = 'auto'; got shape {rounding.shape}")
        try:
            p = np.asarray(profiles, dtype=float)
            losses_ = np.asarray(losses, dtype=float)
        except (TypeError, ValueError):
            raise ValueError("pool.train: profiles and losses must be numbers") from None
        if p.shape != (K, r + 1) or not np.all(np.isfinite(p)) or np.any(p < 0):
            raise ValueError(f"pool.train: profiles must be a finite, non-negative ({K}, {r + 1}) array; "
                             f"got shape {p.shape}")
        if losses_.shape != (K,):
            raise ValueError(f"pool.train: losses must have {K} entries; got shape {losses_.shape}")
        if not isinstance(status, (list, tuple)) or len(status) != K or not all(isinstance(s, str) for s in status):
            raise ValueError(f"pool.train: status must be {K} strings; got {status!r:.60}")
        return TrainReport(profiles=p, losses=losses_, status=list(status), rounding=rounding)

    def check_upload(self, up, keep: int):
        """The strategy's reading of one upload, validated at the trust boundary: the payload
        decodes and fits its allocation (SOFT's decoder also rejects non-finite values), and the
        head has this run's tensors, shapes and finite values. Raises ValueError with the reason."""
        if isinstance(up.bits, bool) or not isinstance(up.bits, (int, np.integer)) or not 0 <= up.bits < 2**53:
            raise ValueError(f"uplink bits must be an integer in 0..2**53; got {up.bits!r:.40}")
        item = self.strategy.decode(up.payload, keep, self)
        if not isinstance(up.head, dict) or set(up.head) != set(self.global_head):
            raise ValueError(f"head tensors {sorted(up.head) if isinstance(up.head, dict) else up.head!r} "
                             f"!= {sorted(self.global_head)}")
        for name, ref in self.global_head.items():
            h = up.head[name]
            if not isinstance(h, torch.Tensor) or h.shape != ref.shape or not bool(torch.isfinite(h).all()):
                raise ValueError(f"head tensor {name} is not a finite {tuple(ref.shape)} tensor")
        return item

    def reject_outliers(self, got: list, decoded: list, status: list, bits: np.ndarray) -> tuple[list, list]:
        """The norm rule (``RunConfig.reject_norm_factor``): a client whose update norm exceeds the
        factor times the round's median norm is rejected (SOFT wire strategies)."""
        factor = self.config.reject_norm_factor
        if factor is None or self.strategy.norm is None or len(got) < 2:
            return got, decoded
        norms = np.array([self.strategy.norm(item) for item in decoded])
        limit = factor * float(np.median(norms))
        keep = [i for i, n in enumerate(norms) if n <= limit]
        for i in sorted(set(range(len(got))) - set(keep)):
            median = limit / factor
            status[got[i]] = f"rejected: update norm {norms[i]:.4g} > {factor:g} × the round's median {median:.4g}"
            bits[got[i]] = 0
        return [got[i] for i in keep], [decoded[i] for i in keep]

    def band_check(self, n: int) -> dict:
        """The prediction for round n from the run's curve re-calibrated on its rounds up to the last
        multiple of ``predict_every`` before n (``convergence.predict_from``; recomputed from the
        history, so a resumed run records the same), and whether the measured loss left its band."""
        from convergence.calibration import loss_curve
        from convergence.predict import predict_from

        N = self.config.predict_every
        out = {"predicted_loss": math.nan, "band_low": math.nan, "band_high": math.nan, "outside_band": math.nan}
        fit_rounds = ((n - 1) // N) * N if N else 0
        if fit_rounds < 3 or self.config.eval_every != 1:
            return out
        if self._prediction[0] != fit_rounds:
            try:
                cal = predict_from(self.history, rounds=fit_rounds, boots=50, rng=self.config.seed)
            except ValueError:  # e.g. no start loss: no prediction, the run goes on
                cal = None
            self._prediction = (fit_rounds, cal)
        cal = self._prediction[1]
        if cal is None:
            return out
        pilot = cal.model.pilots[0]
        pred = cal.predict(pilot.rank, None, n, kept_share=pilot.kept, rng=self.config.seed)
        measured = float(loss_curve(self.history)[0][n])
        lo, hi = float(pred.low[-1]), float(pred.high[-1])
        out.update(predicted_loss=float(pred.predicted[-1]), band_low=lo, band_high=hi,
                   outside_band=float(not lo <= measured <= hi) if math.isfinite(measured) else math.nan)
        return out

    def record(self, t, report, decision, status, sent, bits, snr, latency, queue_before, start,
               broadcast_bits: int) -> dict:
        """Evaluate (every ``eval_every`` rounds and at the end) and append the ledger rows
        (``broadcast_bits``: what each client received at the round's start, one number or one
        per client)."""
        cfg, K = self.config, self.config.clients
        broadcast_bits = np.broadcast_to(np.asarray(broadcast_bits, dtype=np.int64), (K,))
        profiles, keep = np.asarray(report.profiles, dtype=float), decision.keep
        ok = [k for k in range(K) if report.status[k] == "ok"]
        test_loss, acc = math.nan, math.nan
        if (t + 1) % cfg.eval_every == 0 or t + 1 == cfg.rounds:
            self.task.assign(self.global_factors, self.global_head)
            test_loss, acc = self.task.evaluate()
        row = {"round": t + 1, "latency_s": latency, "wallclock_s": self.wallclock, "queue_s": queue_before,
               "latency_budget_s": self.tau_bar, "uplink_bits": int(bits.sum()),
               "downlink_bits": int(broadcast_bits.sum()), "scheduled": len(sent),
               "dropped": sum(1 for s in status if s not in ("ok", "skipped")),
               "dropped_energy": float(sum(self.weights[k] * profiles[k, keep[k]] for k in ok)) if ok else math.nan,
               "mean_value_bits": self.mean_value_bits(decision, sent),
               "train_loss": float(np.nanmean(report.losses)) if ok else math.nan,
               "test_loss": test_loss, "accuracy": acc, "solve_time_s": decision.solve_time_s,
               "fallback": decision.fallback, **start}
        extra = getattr(self.task, "ledger_metrics", None)  # e.g. hf-causal-lm's perplexity
        if extra is not None:
            row.update(extra(test_loss, acc))
        if ok:  # the dense update energy Σ p̃ e_k(0) and the mean normalised error profile (offline prediction)
            mean_profile = (self.weights[ok] / self.weights[ok].sum()) @ profiles[ok]
            row["update_energy"] = float(mean_profile[0])
            row["profile"] = [float(x) for x in (mean_profile / mean_profile[0] if mean_profile[0] > 0
                                                 else mean_profile)]
        if hasattr(self.task, "objective"):  # f(θ_{t+1}), the point the bound at round t+1 speaks of
            self.task.assign(self.global_factors)
            row["objective_after"] = self.task.objective(self.weights)[0]
        self.history.rounds.append(row)
        row.update(self.band_check(t + 1))
        finish = self.downlink_s + self.compute_s + decision.upload_s
        for k in range(K):
            self.history.clients.append({
                "round": t + 1, "client": k, "status": status[k], "keep": int(keep[k]),
                "uplink_bits": int(bits[k]), "downlink_bits": int(broadcast_bits[k]),
                "bandwidth_hz": float(decision.bandwidth_hz[k]),
                "snr_hz": float(snr[k]), "compute_s": float(self.compute_s[k]), "upload_s": float(decision.upload_s[k]),
                "finish_s": float(finish[k]), "train_loss": float(report.losses[k]),
                "dropped_energy": float(profiles[k, keep[k]]) if k in ok else math.nan,
                "value_bits": self.config.base_value_bits if decision.value_bits is None or keep[k] == 0
                else int(decision.value_bits[k]),
            })
        return row

    def mean_value_bits(self, decision: Decision, sent: list) -> float:
        """The mean precision (bits per value) of the round's uploads (NaN when nobody sent)."""
        if not sent or self.policy is None and not self.strategy.train_b:
            return math.nan
        q = decision.value_bits
        return float(np.mean([self.config.base_value_bits if q is None else q[k] for k in sent]))

    def fold(self, name: str, delta: torch.Tensor) -> None:
        """Add ``delta`` to module ``name``'s frozen weight (and remember it for checkpoints)."""
        delta = delta.float()
        self.task.fold(name, delta)
        self.folded[name] = delta.clone() if self.folded[name] is None else self.folded[name] + delta

    # -- checkpoints (fedloop.checkpoint: safetensors + JSON + SHA-256) -----------------------------
    def named_tensors(self) -> dict:
        """The server's tensors by checkpoint name: global/<module>/A|B, head/<name>, folded/<module>."""
        out = {f"global/{n}/A": A for n, (A, _) in self.global_factors.items()}
        out |= {f"global/{n}/B": B for n, (_, B) in self.global_factors.items()}
        out |= {f"head/{n}": t for n, t in self.global_head.items()}
        out |= {f"residual/{k}/{n}/{f}": t for k, e in enumerate(self.residuals) if e is not None
                for n, pair in e.items() for f, t in zip("AB", pair, strict=True)}
        if self.view is not None:
            out |= {f"view/{n}/{f}": t for n, pair in self.view.items() for f, t in zip("AB", pair, strict=True)}
        return out | {f"folded/{n}": t for n, t in self.folded.items() if t is not None}

    def _residuals_from(self, tensors: dict) -> tuple[list, list]:
        """The clients' residuals in a checkpoint's tensors (``residual/<client>/<module>/A|B``):
        (list per client, names of the tensors that do not fit: wrong dtype or shape, a client
        or module this run does not have, or a module with A or B missing)."""
        out, odd = [None] * self.config.clients, []
        for key in sorted(k for k in tensors if k.startswith("residual/")):
            parts = key.split("/")
            ok = len(parts) == 4 and parts[1].isdigit() and int(parts[1]) < self.config.clients \
                and parts[2] in self.global_factors and parts[3] in ("A", "B")
            if ok:
                ref = self.global_factors[parts[2]][0 if parts[3] == "A" else 1]
                ok = tensors[key].dtype == ref.dtype and tensors[key].shape == ref.shape \
                    and bool(torch.isfinite(tensors[key]).all())
            if not ok:
                odd.append(key)
                continue
            k = int(parts[1])
            out[k] = out[k] or {}
            pair = out[k].get(parts[2], [None, None])
            pair[0 if parts[3] == "A" else 1] = tensors[key]
            out[k][parts[2]] = pair
        for k, e in enumerate(out):
            if e is not None:
                if set(e) != set(self.names) or any(t is None for pair in e.values() for t in pair):
                    odd.append(f"residual/{k}")
                    out[k] = None
                else:
                    out[k] = {n: tuple(e[n]) for n in self.names}
        return out, odd

    def save_checkpoint(self, folder) -> None:
        """Write ``folder/checkpoint.safetensors`` atomically (a crash leaves the previous one intact)."""
        tensors = self.named_tensors()
        state = {"round": self.round, "wallclock": self.wallclock, "history": self.history.to_dict(),
                 "policy": self.policy.state_dict() if isinstance(self.policy, OnlineAllocator) else None,
                 "config": self.config.to_dict(), "broadcast_bits": self.broadcast_bits}
        save_checkpoint(folder, tensors, state)

    def load_checkpoint(self, folder) -> None:
        """Continue from ``folder``'s checkpoint, written by a run of the same config (rounds, out
        and checkpoint_every may differ). Everything is verified before anything changes."""
        tensors, st = load_checkpoint(folder)
        path = Path(folder) / CHECKPOINT
        mine, theirs = json.loads(json.dumps(self.config.to_dict())), st.get("config")
        if not isinstance(theirs, dict):
            raise CheckpointError(f"{path}: no config in the checkpoint")
        for key in ("rounds", "out", "checkpoint_every"):
            mine.pop(key, None)
            theirs.pop(key, None)
        for key, default in (("device", "cpu"), ("dtype", "float32"), ("hf", {})):  # newer than some checkpoints
            if key not in theirs and mine.get(key) == default:
                mine.pop(key)
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise CheckpointError(f"cannot resume from {path}: it was written with a different config ({diff})")
        want = {k: t for k, t in self.named_tensors().items() if not k.startswith(("folded/", "residual/"))}
        folded = {n: tensors.get(f"folded/{n}") for n in self.names}
        residuals, odd_residuals = self._residuals_from(tensors)
        extra = sorted(set(tensors) - set(want) - {f"folded/{n}" for n in self.names}
                       - {k for k in tensors if k.startswith("residual/") and self.config.error_feedback != "none"})
        missing = sorted(set(want) - set(tensors))
        odd = sorted(k for k, t in want.items() if k in tensors and (tensors[k].shape != t.shape
                                                                     or tensors[k].dtype != t.dtype))
        odd += sorted(f"folded/{n}" for n, d in folded.items() if d is not None and (d.dtype != torch.float32 or d.shape
                      != (self.global_factors[n][1].shape[0], self.global_factors[n][0].shape[1])))
        odd += odd_residuals
        if missing or extra or odd:
            raise CheckpointError(f"{path}: tensors do not fit this run (missing {missing}, unexpected {extra}, "
                                  f"wrong shape or dtype {odd})")
        try:
            history = History.from_dict(st.get("history"))
        except ValueError as exc:
            raise CheckpointError(f"{path}: its ledger is not valid: {exc}") from None
        ledger_config = {k: v for k, v in history.config.items() if k not in ("rounds", "out", "checkpoint_every")}
        if ledger_config != theirs or history.meta.get("latency_budget_s") != self.tau_bar:
            raise CheckpointError(f"{path}: its ledger was not written by this run (config or τ̄ differ)")
        round_, wallclock = st.get("round"), st.get("wallclock")
        if isinstance(round_, bool) or not isinstance(round_, int) or round_ != len(history.rounds) \
                or isinstance(wallclock, bool) or not isinstance(wallclock, (int, float)) or not 0 <= wallclock < 1e300:
            raise CheckpointError(f"{path}: round {round_!r} / wallclock {wallclock!r} do not fit its ledger")
        broadcast = st.get("broadcast_bits", self.broadcast_bits)
        if self.view is not None and (isinstance(broadcast, bool) or not isinstance(broadcast, int)
                                      or not self.head_bits <= broadcast < 2**53):
            raise CheckpointError(f"{path}: broadcast_bits {broadcast!r:.40} is not a number of bits")
        policy = st.get("policy")
        if (policy is None) != (not isinstance(self.policy, OnlineAllocator)):
            raise CheckpointError(f"{path}: allocator state {'missing' if policy is None else 'unexpected'}")
        if policy is not None:
            mine_policy = self.policy.state_dict()
            fixed = ("latency_budget_s", "weight_v", "drift")
            if not isinstance(policy, dict) or any(policy.get(k) != mine_policy.get(k) for k in fixed) \
                    or policy.get("round") != round_:
                raise CheckpointError(f"{path}: its allocator state does not fit this run ({', '.join(fixed)} "
                                      "and round must match)")
            try:
                self.policy.load_state_dict(policy)  # validates everything before it changes anything
            except ValueError as exc:
                raise CheckpointError(f"{path}: its allocator state is not valid: {exc}") from None
        self.round, self.wallclock, self.history = round_, float(wallclock), history
        self.global_factors = {n: (tensors[f"global/{n}/A"], tensors[f"global/{n}/B"]) for n in self.names}
        self.global_head = {n: tensors[f"head/{n}"] for n in self.global_head}
        self.folded = folded
        self.residuals = residuals
        if self.view is not None:
            self.view = {n: (tensors[f"view/{n}/A"], tensors[f"view/{n}/B"]) for n in self.names}
            self.set_broadcast(broadcast - self.head_bits)
        for name, delta in folded.items():
            if delta is not None:
                self.task.fold(name, delta)
