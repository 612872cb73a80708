"""The federated LoRA loop with the wireless ledger: ``fedloop.run(config) -> History``.

A round t:

1. the server broadcasts the global factors (and head); downlink time = r·M·q bits at
   ``DOWNLINK_RATE_BPS``;
2. each client trains E local steps (task loss + λ·R_orth) from them, with a fresh
   optimiser, and reports its error profile e_k(s) (SOFT importances);
3. this round's channel is drawn (Rayleigh fading on fixed client positions) and the
   strategy's policy chooses keep counts and bandwidth (``tsfa``: the OnlineAllocator);
4. clients encode their updates to bytes; the server decodes and aggregates; clients
   that miss the deadline or fail are dropped from the aggregate and recorded;
5. the server re-orthogonalises the global factors (SOFT strategies), evaluates, writes
   the ledger, and checkpoints every ``checkpoint_every`` rounds.

Randomness is derived from (seed, round, client) — channel draws, minibatches, dropout
and random components — so a resumed run repeats an uninterrupted one exactly and every
strategy sees the same channels and batches for the same seed.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch

import soft
from fedloop.config import RunConfig
from fedloop.history import History
from fedloop.tasks import make_task
from soft.baselines import decode_topk, ffa_bits, ffa_update, svd_truncation_qr, topk_elementwise
from soft.optim import TensorwiseAdam
from tsfa import Cell, min_latency_bandwidth
from tsfa.allocator import DensePolicy, FixedPolicy, OnlineAllocator
from tsfa.model import LoraShape
from tsfa.simulate import dense_latency_s

__all__ = ["run", "RunFailed", "DOWNLINK_RATE_BPS", "REMOTE_STRATEGIES", "train_client", "encode_update"]

#: Strategies whose clients can run elsewhere (fedloop.flower): SOFT wire payloads, no local factors needed.
REMOTE_STRATEGIES = ("tsfa", "fixed", "random", "fedit")

#: Broadcast rate of the global adapter, bit/s (the downlink is not the bottleneck studied).
DOWNLINK_RATE_BPS = 100e6


class RunFailed(RuntimeError):
    """The run cannot continue (e.g. a non-finite loss); the last checkpoint is intact."""


def _seed(*parts) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _rng(*parts) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) for p in parts]))


class _Run:
    def __init__(self, cfg: RunConfig, client_hook=None):
        self.cfg = cfg
        self.hook = client_hook
        self.task = make_task(cfg)
        self.K = cfg.clients
        self.p = self.task.client_sizes / self.task.client_sizes.sum()
        live = self.task.factors()
        self.names = list(live)
        self.head_numel = sum(p.numel() for p in self.task.head().values())
        self.head_bits = 32 * self.head_numel
        base = soft.shape_of(live)
        # The allocator's payload includes the dense head: header H + head bits.
        self.shape = LoraShape(base.modules, base.rank, base.bits_per_value, base.header_bits + self.head_bits)
        self.soft_shape = base
        self.cell = Cell(total_bandwidth_hz=cfg.bandwidth_hz)
        self.clients = self.cell.sample_clients(self.K, rng=_rng(cfg.seed, 11))
        self.compute_s = self.clients.compute_time_s(cfg.local_steps * cfg.batch_size * self.task.flops_per_sample)
        # τ̄ is the system's: the dense latency of the configured rank r, the same for every strategy
        # (``lowrank`` builds a smaller adapter, ``head`` sends no adapter, both under the same τ̄).
        nominal = base.with_rank(cfg.rank)
        self.downlink_s = nominal.downlink_bits / DOWNLINK_RATE_BPS
        self.dense_median_s = dense_latency_s(self.cell, self.clients, LoraShape(
            nominal.modules, nominal.rank, nominal.bits_per_value, self.shape.header_bits), self.compute_s,
            downlink_s=self.downlink_s, rng=_rng(cfg.seed, 12))
        self.tau_bar = cfg.latency_budget_s or cfg.budget_factor * self.dense_median_s
        # What one client receives per round: the global adapter and head (``head``: the head only,
        # the adapter never changes).
        self.broadcast_bits = self.head_bits + (0 if cfg.strategy == "head" else base.downlink_bits)
        self.downlink_s = (self.broadcast_bits - self.head_bits) / DOWNLINK_RATE_BPS if cfg.strategy != "head" \
            else self.head_bits / DOWNLINK_RATE_BPS
        cap = None if cfg.cap_factor is None else cfg.cap_factor * self.tau_bar
        kw = dict(total_bandwidth_hz=cfg.bandwidth_hz, downlink_s=self.downlink_s)
        s = cfg.strategy
        if s == "tsfa":
            # Scale-free V: profiles are passed relative to the round's mean dense energy and V is in
            # units of τ̄² (Q·τ is in s²), so the objective / τ̄² = v·Σp·e_rel + (Q/τ̄)(τ/τ̄).
            self.policy = OnlineAllocator(self.shape, latency_budget_s=self.tau_bar,
                                          weight_v=cfg.weight_v * self.tau_bar**2,
                                          max_latency_s=cap, allow_skip=cfg.allow_skip,
                                          queue=cfg.initial_queue, drift=cfg.drift, **kw)
        elif s == "fixed":
            self.policy = FixedPolicy(self.shape, keep=cfg.keep, bandwidth="equal", **kw)
        elif s in ("random", "svd", "topk"):
            self.policy = FixedPolicy(self.shape, keep=cfg.keep, bandwidth="min_latency", **kw)
        elif s in ("fedit", "ideal", "lowrank"):
            self.policy = DensePolicy(self.shape, **kw)
        else:  # ffa (dense B only), head (the head only): latency-optimal split of their own payload
            self.policy = None
        glob = soft.clone_factors(live)
        if cfg.resolved_reorthogonalize:
            glob = soft.reorthogonalize_factors(glob)
        self.glob = glob
        self.ghead = {k: v.detach().clone() for k, v in self.task.head().items()}
        self.folded = {n: None for n in self.names}  # Σ of deltas folded into frozen weights (ideal, svd)
        self.history = History(config=cfg.to_dict())
        self.history.meta.update(latency_budget_s=self.tau_bar, dense_median_latency_s=self.dense_median_s,
                                 downlink_s=self.downlink_s, head_bits=self.head_bits,
                                 lora_parameters=base.num_parameters,
                                 model_parameters=int(sum(p.numel() for p in self.task.model.parameters())),
                                 payload_bits_dense=self.shape.dense_payload_bits)
        self.round = 0
        self.wallclock = 0.0
        self._diag: dict = {}

    # -- checkpoints -----------------------------------------------------------------------
    def state(self) -> dict:
        return {"round": self.round, "wallclock": self.wallclock, "glob": self.glob, "ghead": self.ghead,
                "folded": self.folded, "history": self.history.to_dict(),
                "policy": self.policy.state_dict() if isinstance(self.policy, OnlineAllocator) else None,
                "config": self.cfg.to_dict()}

    def save_checkpoint(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "checkpoint.pt.tmp"
        torch.save(self.state(), tmp)
        os.replace(tmp, folder / "checkpoint.pt")

    def load_checkpoint(self, folder: Path) -> None:
        st = torch.load(folder / "checkpoint.pt", weights_only=False)
        mine, theirs = self.cfg.to_dict(), dict(st["config"])
        for key in ("rounds", "out", "checkpoint_every"):
            mine.pop(key, None)
            theirs.pop(key, None)
        if mine != theirs:
            diff = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise ValueError(f"cannot resume: the checkpoint was written with a different config ({diff})")
        self.round, self.wallclock = st["round"], st["wallclock"]
        self.glob, self.ghead, self.folded = st["glob"], st["ghead"], st["folded"]
        for name, delta in self.folded.items():
            if delta is not None:
                self.task.fold(name, delta)
        self.history = History.from_dict(st["history"])
        if st["policy"] is not None:
            self.policy.load_state_dict(st["policy"])

    # -- one client's local training -----------------------------------------------------------
    def local_train(self, t: int, k: int):
        diag = self._diag[k] = {"norm_max": 0.0, "grad": None, "grad_sq_max": math.nan, "noise_max": math.nan}
        stats = getattr(self.task, "client_statistics", None)

        def on_step(kind, live, lam):  # measurements for the bound's constants (convergence)
            if stats is not None:  # at x_0 (kind "gradient") and after every step
                g2, var = stats(k, self.cfg.batch_size)
                diag["grad_sq_max"] = np.fmax(diag["grad_sq_max"], g2)
                diag["noise_max"] = np.fmax(diag["noise_max"], var)
            if kind == "iterate":
                diag["norm_max"] = max(diag["norm_max"], _spectral_norm_max(live))
                return
            params = [p for pair in live.values() for p in pair if p.requires_grad]
            grads = [p.grad.detach().double().clone() for p in params]
            if lam:  # the task loss's gradient alone: take the penalty's gradient away
                pen = torch.autograd.grad(lam * soft.factors_penalty(live), params, allow_unused=True)
                grads = [g - (0 if q is None else q.double()) for g, q in zip(grads, pen, strict=True)]
            diag["grad"] = torch.cat([g.flatten() for g in grads])

        return train_client(self.cfg, self.task, self.glob, self.ghead, t, k, on_step=on_step)

    # -- one round -----------------------------------------------------------------------------
    def step(self, clients=None) -> dict:
        """One round. ``clients=None``: the K clients train here, in this process. Otherwise the
        clients are remote (:mod:`fedloop.flower`) and ``clients`` is a pool with
        ``train(t) -> (profiles K×(r+1), losses K, status K)`` (phase 1 done elsewhere) and
        ``upload(t, sent, keep, bandwidth_hz) -> {k: (payload bytes, head) or error text}``;
        this method then runs only the server's part (policy, aggregation, ledger)."""
        cfg, K, t = self.cfg, self.K, self.round
        local, heads, losses, status = [None] * K, [None] * K, np.full(K, np.nan), ["ok"] * K
        r = self.shape.rank
        self._diag = {}
        start = self._start_diagnostics()
        if clients is None:
            for k in range(K):
                try:
                    if self.hook is not None:
                        self.hook(t + 1, k)
                    local[k], heads[k], losses[k] = self.local_train(t, k)
                except RunFailed:
                    raise
                except Exception as exc:  # a failing client is dropped from this round, the run goes on
                    status[k] = f"error: {type(exc).__name__}: {exc}"[:200]
            ok = [k for k in range(K) if local[k] is not None]
            profiles = np.zeros((K, r + 1))
            for k in ok:
                profiles[k] = soft.error_profile(self.glob, local[k], scope=cfg.scope)
        else:
            profiles, losses, status = clients.train(t)
            profiles, losses, status, local = np.asarray(profiles, dtype=float), np.asarray(losses), list(status), None
            ok = [k for k in range(K) if status[k] == "ok"]
        # A failed client reports nothing: it is not scheduled (zero error profile, keep 0 allowed).
        snr = self.cell.sample_snr_hz(self.clients, rng=_rng(cfg.seed, 31, t))
        t0 = time.perf_counter()
        if self.policy is None:  # ffa, head: every client that trained sends its payload
            lora_bits = ffa_bits(self.glob) if cfg.strategy == "ffa" else 0
            bits = np.full(K, lora_bits + self.head_bits)
            keep = np.full(K, r if cfg.strategy == "ffa" else 0)
            bw = min_latency_bandwidth(bits, snr, self.compute_s, cfg.bandwidth_hz, downlink_s=self.downlink_s)
            bandwidth, upload, fallback = bw.bandwidth_hz, np.nan_to_num(bw.upload_time_s), ""
            # a client with nothing to upload still computes: the round lasts until the last one is done
            latency = max(bw.latency_s, float(np.max(self.downlink_s + self.compute_s[ok] + upload[ok]))) if ok \
                else bw.latency_s
        else:
            scale = float(np.sum(self.p[ok] * profiles[ok, 0])) if ok else 0.0
            rel = profiles / scale if scale > 0 else profiles
            alloc = self.policy.step(snr, self.compute_s, rel, self.p)
            keep = np.array(alloc.keep)
            bandwidth, upload, latency = np.array(alloc.bandwidth_hz), np.array(alloc.upload_time_s), alloc.latency_s
            fallback = alloc.fallback
        solve_time = time.perf_counter() - t0
        finish = self.downlink_s + self.compute_s + upload
        deadline = None if cfg.deadline_factor is None else cfg.deadline_factor * self.tau_bar
        sent = []
        for k in range(K):
            if status[k] != "ok":
                continue
            if keep[k] == 0 and self.policy is not None:
                status[k] = "skipped"
            elif deadline is not None and finish[k] > deadline:
                status[k] = "deadline"
            else:
                sent.append(k)
        if deadline is not None and any(s == "deadline" for s in status):
            latency = deadline
        # -- uplink: real bytes for the SOFT wire format; aggregation ---------------------------
        bits_k = np.zeros(K, dtype=np.int64)
        if clients is None:
            folded_before = {n: None if v is None else v.clone() for n, v in self.folded.items()}
            self.aggregate(sent, local, keep, bits_k, t)
            start.update(self._aggregation_diagnostics(ok, local, folded_before))
        else:
            sent = self.aggregate_remote(clients, sent, keep, bandwidth, bits_k, status, heads, t)
        for k in sent:
            bits_k[k] += self.head_bits
        if sent:
            w = self.p[sent] / self.p[sent].sum()
            self.ghead = {n: sum(wk * heads[k][n] for wk, k in zip(w, sent, strict=True)) for n in self.ghead}
        if cfg.resolved_reorthogonalize:
            self.glob = soft.reorthogonalize_factors(self.glob)
        if isinstance(self.policy, OnlineAllocator):
            queue_before = self.policy.queue
            self.policy.observe(latency)
        else:
            queue_before = math.nan
        self.wallclock += latency
        # Remote clients send only their kept components: the server cannot form C (NaN).
        cov = (soft.factors_covariance_norm([local[k] for k in sent], self.p[sent]) if local is not None
               else math.nan) if len(sent) > 1 else 0.0
        dropped_energy = float(sum(self.p[k] * profiles[k, keep[k]] for k in ok)) if ok else math.nan
        test_loss, acc = math.nan, math.nan
        if (t + 1) % cfg.eval_every == 0 or t + 1 == cfg.rounds:
            _write(self.task.factors(), self.glob)
            _write(self.task.head(), self.ghead)
            test_loss, acc = self.task.evaluate()
        row = {"round": t + 1, "latency_s": latency, "wallclock_s": self.wallclock, "queue_s": queue_before,
               "latency_budget_s": self.tau_bar, "uplink_bits": int(bits_k.sum()),
               "downlink_bits": int(self.broadcast_bits * K), "scheduled": len(sent),
               "dropped": sum(1 for s in status if s not in ("ok", "skipped")), "dropped_energy": dropped_energy,
               "covariance_norm": cov, "train_loss": float(np.nanmean(losses)) if ok else math.nan,
               "test_loss": test_loss, "accuracy": acc, "solve_time_s": solve_time, "fallback": fallback}
        row.update(start)
        if ok:  # the dense update energy Σ p̃ e_k(0) and the mean normalised error profile (offline prediction)
            w_ok = self.p[ok] / self.p[ok].sum()
            mean_profile = w_ok @ profiles[ok]
            row["update_energy"] = float(mean_profile[0])
            row["profile"] = [float(x) for x in (mean_profile / mean_profile[0] if mean_profile[0] > 0
                                                 else mean_profile)]
        if hasattr(self.task, "objective"):  # f(θ_{t+1}), the point the bound at round t+1 speaks of
            _write(self.task.factors(), self.glob)
            row["objective_after"] = self.task.objective(self.p)[0]
        self.history.rounds.append(row)
        for k in range(K):
            self.history.clients.append({
                "round": t + 1, "client": k, "status": status[k], "keep": int(keep[k]),
                "uplink_bits": int(bits_k[k]), "bandwidth_hz": float(bandwidth[k]), "snr_hz": float(snr[k]),
                "compute_s": float(self.compute_s[k]), "upload_s": float(upload[k]), "finish_s": float(finish[k]),
                "train_loss": float(losses[k]), "dropped_energy": float(profiles[k, keep[k]]) if k in ok else math.nan,
            })
        self.round += 1
        return row

    # -- measurements for the convergence bound (docs/theory.md) --------------------------------
    def _start_diagnostics(self) -> dict:
        """At the round's start point θ_t: the global training objective f(θ_t) and ‖∇f(θ_t)‖²
        where the task can compute them (linear: exact full-batch; NaN otherwise), and the
        largest spectral norm of the global factors."""
        out = {"objective": math.nan, "gradient_norm_sq": math.nan,
               "factor_norm_max": _spectral_norm_max(self.glob)}
        if hasattr(self.task, "objective"):
            _write(self.task.factors(), self.glob)
            out["objective"], out["gradient_norm_sq"] = self.task.objective(self.p)
        return out

    def _aggregation_diagnostics(self, ok, local, folded_before) -> dict:
        """What aggregation lost this round, in product units of B·A (divide folded deltas by γ):
        product_error ‖W_{t+1} − Σ p̃_k B_k A_k‖², sparsification_error ‖W_{t+1} − B̄Ā‖² (B̄, Ā the
        plain weighted means of all trained clients' factors) and covariance_sq ‖C‖² =
        ‖Σ p̃_k B_k A_k − B̄Ā‖², with p̃ the data weights renormalised over the trained clients;
        plus the mean squared first-step gradient Σ p̃‖g_k‖², its mean's square ‖Σ p̃ g_k‖², and
        the largest factor spectral norm seen along the local iterates."""
        nan = {"product_error": math.nan, "sparsification_error": math.nan, "covariance_sq": math.nan,
               "grad_sq_mean": math.nan, "grad_mean_sq": math.nan, "local_norm_max": math.nan,
               "client_grad_sq_max": math.nan, "client_noise_max": math.nan}
        if not ok:
            return nan
        w = self.p[ok] / self.p[ok].sum()
        gamma = self.task.scaling
        pe = se = 0.0
        for name in self.names:
            mean_prod = sum(wk * (local[k][name][1].double() @ local[k][name][0].double())
                            for wk, k in zip(w, ok, strict=True))
            Bb = sum(wk * local[k][name][1].double() for wk, k in zip(w, ok, strict=True))
            Ab = sum(wk * local[k][name][0].double() for wk, k in zip(w, ok, strict=True))
            A1, B1 = self.glob[name]
            new = B1.double() @ A1.double()
            after, before = self.folded[name], folded_before[name]
            if after is not None:
                new = new + (after.double() - (0 if before is None else before.double())) / gamma
            pe += float(((new - mean_prod) ** 2).sum())
            se += float(((new - Bb @ Ab) ** 2).sum())
        cs = soft.factors_covariance_norm([local[k] for k in ok], w) ** 2 if len(ok) > 1 else 0.0
        out = {"product_error": pe, "sparsification_error": se, "covariance_sq": cs}
        grads = [self._diag.get(k, {}).get("grad") for k in ok]
        if all(g is not None for g in grads):
            out["grad_sq_mean"] = float(sum(wk * float(g @ g) for wk, g in zip(w, grads, strict=True)))
            gm = sum(wk * g for wk, g in zip(w, grads, strict=True))
            out["grad_mean_sq"] = float(gm @ gm)
        else:
            out["grad_sq_mean"] = out["grad_mean_sq"] = math.nan
        out["local_norm_max"] = max(self._diag.get(k, {}).get("norm_max", 0.0) for k in ok)
        out["client_grad_sq_max"] = float(np.nanmax([self._diag.get(k, {}).get("grad_sq_max", math.nan)
                                                     for k in ok] + [-np.inf]))
        out["client_noise_max"] = float(np.nanmax([self._diag.get(k, {}).get("noise_max", math.nan)
                                                   for k in ok] + [-np.inf]))
        for key in ("client_grad_sq_max", "client_noise_max"):
            if not np.isfinite(out[key]):
                out[key] = math.nan
        return out

    def aggregate(self, sent, local, keep, bits_k, t):
        cfg, s = self.cfg, self.cfg.strategy
        if not sent:
            return
        w = self.p[sent]
        if s == "head":  # the adapter stays as it is; the head is averaged in step()
            return
        if s in ("tsfa", "fixed", "random", "fedit", "ideal", "lowrank"):
            payloads = {k: encode_update(cfg, self.glob, local[k], int(keep[k]), t, k) for k in sent}
            new = self.aggregate_payloads(sent, payloads, bits_k)
            if s == "ideal":  # fold Σ p B_k A_k − B̄Ā into the frozen weights (FedEx-LoRA)
                wn = torch.as_tensor(w / w.sum())
                for name in self.names:
                    Ab, Bb = new[name]
                    mean_prod = sum(wk * (local[k][name][1].double() @ local[k][name][0].double())
                                    for wk, k in zip(wn, sent, strict=True))
                    resid = (mean_prod - Bb.double() @ Ab.double()) * self.task.scaling
                    self._fold(name, resid)
            self.glob = new
        elif s == "topk":
            num = {n: [torch.zeros_like(A, dtype=torch.float64), torch.zeros_like(B, dtype=torch.float64)]
                   for n, (A, B) in self.glob.items()}
            den = {n: [torch.zeros_like(A, dtype=torch.float64), torch.zeros_like(B, dtype=torch.float64)]
                   for n, (A, B) in self.glob.items()}
            for wk, k in zip(w, sent, strict=True):
                data = topk_elementwise(self.glob, local[k], int(keep[k])).encode()
                bits_k[k] = 8 * len(data)
                tk = decode_topk(data, self.soft_shape)
                for n, da, db in zip(self.names, tk.delta_a, tk.delta_b, strict=True):
                    num[n][0] += wk * da.double()
                    num[n][1] += wk * db.double()
                    den[n][0] += wk * (da != 0)
                    den[n][1] += wk * (db != 0)
            self.glob = {n: (A + (num[n][0] / den[n][0].clamp_min(1e-300)).to(A.dtype),
                             B + (num[n][1] / den[n][1].clamp_min(1e-300)).to(B.dtype))
                         for n, (A, B) in self.glob.items()}
        elif s == "svd":
            wn = w / w.sum()
            for wk, k in zip(wn, sent, strict=True):
                trunc = svd_truncation_qr(self.glob, local[k], int(keep[k]))
                bits_k[k] = self.soft_shape.payload_bits(int(keep[k]))
                for name, (P, Q) in zip(self.names, trunc, strict=True):
                    self._fold(name, wk * self.task.scaling * (P @ Q))
        elif s == "ffa":
            for k in sent:
                _, b = ffa_update(self.glob, local[k])
                bits_k[k] = b
            wn = w / w.sum()
            self.glob = {n: (A, sum(wk * local[k][n][1] for wk, k in zip(wn, sent, strict=True)))
                         for n, (A, B) in self.glob.items()}

    def aggregate_payloads(self, sent, payloads, bits_k) -> dict:
        """New global factors from the SOFT payload bytes of the clients in ``sent`` (decoded
        against this run's adapter shape, rank-wise average with the data weights); records
        each payload's bits in ``bits_k``."""
        updates = []
        for k in sent:
            bits_k[k] = 8 * len(payloads[k])
            updates.append(soft.decode(payloads[k], self.soft_shape))
        return soft.aggregate(self.glob, updates, self.p[sent])

    def aggregate_remote(self, clients, sent, keep, bandwidth, bits_k, status, heads, t) -> list:
        """Uplink of remote clients: ask the scheduled ones for their payloads; a client that
        fails to deliver (no reply, an error, an undecodable payload) is dropped from the round
        with its reason in ``status``. Returns the clients aggregated."""
        if self.cfg.strategy not in REMOTE_STRATEGIES:
            raise ValueError(f"strategy {self.cfg.strategy!r} cannot run with remote clients; "
                             f"use one of {REMOTE_STRATEGIES}")
        if not sent:
            return []
        replies = clients.upload(t, list(sent), {k: int(keep[k]) for k in sent},
                                 {k: float(bandwidth[k]) for k in sent})
        got, payloads = [], {}
        for k in sent:
            rep = replies.get(k, "no reply")
            if isinstance(rep, str):
                status[k] = f"error: {rep}"[:200]
                continue
            data, head = rep
            try:
                upd = soft.decode(data, self.soft_shape)
                if upd.keep != int(keep[k]):
                    raise soft.WireFormatError(f"payload keeps {upd.keep} components, {int(keep[k])} were allocated")
                if set(head) != set(self.ghead):
                    raise ValueError(f"head tensors {sorted(head)} != {sorted(self.ghead)}")
            except ValueError as exc:  # WireFormatError is a ValueError
                status[k] = f"error: bad payload: {exc}"[:200]
                continue
            payloads[k], heads[k] = data, head
            got.append(k)
        if got:
            self.glob = self.aggregate_payloads(got, payloads, bits_k)
        return got

    def _fold(self, name, delta):
        delta = delta.float()
        self.task.fold(name, delta)
        self.folded[name] = delta.clone() if self.folded[name] is None else self.folded[name] + delta


def train_client(cfg: RunConfig, task, glob: dict, ghead: dict, t: int, k: int, on_step=None):
    """Client k's local training in round t (0-based) from the global factors ``glob`` and head
    ``ghead``: E steps of task loss + λ·R_orth with a fresh optimiser, seeded from (seed, t, k).

    ``on_step(kind, live, penalty)``, if given, is called after the first backward pass
    (kind "gradient": the ``.grad`` of the factors hold that step's gradient) and after every
    optimiser step (kind "iterate"); the loop uses it to measure the bound's constants.

    Returns (local factors, local head, mean training loss). Module-level so that a Flower
    node (:mod:`fedloop.flower`) runs exactly the code of the in-process loop.
    """
    _write(task.factors(), glob)
    _write(task.head(), ghead)
    torch.manual_seed(_seed(cfg.seed, 21, t, k))
    rng = _rng(cfg.seed, 22, t, k)
    live = task.factors()
    freeze_a, freeze_b = cfg.strategy in ("ffa", "head"), cfg.strategy == "head"
    for A, B in live.values():
        A.requires_grad_(not freeze_a)
        B.requires_grad_(not freeze_b)
    params = [p for pair in live.values() for p in pair if p.requires_grad]
    opt_name = cfg.resolved_optimizer
    if not params:
        opt = None
    elif opt_name == "tadam":
        opt = TensorwiseAdam(params, lr=cfg.lr)
    elif opt_name == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    head = list(task.head().values())
    head_opt = torch.optim.AdamW(head, lr=cfg.head_lr, weight_decay=0.0) if head else None
    lam = cfg.resolved_penalty
    task.train()
    losses = []
    for step in range(cfg.local_steps):
        loss = task.loss(task.sample(k, cfg.batch_size, rng))
        if not torch.isfinite(loss):
            raise RunFailed(f"client {k} produced a non-finite loss ({loss.item()}) at round {t + 1}, "
                            f"local step {step + 1}; lower lr (now {cfg.lr}) — the last checkpoint is kept")
        losses.append(loss.item())
        total = loss + lam * soft.factors_penalty(live) if lam else loss
        if opt:
            opt.zero_grad()
        if head_opt:
            head_opt.zero_grad()
        if total.requires_grad:
            total.backward()
        if on_step is not None and step == 0 and opt:
            on_step("gradient", live, lam)
        if opt:
            opt.step()
        if head_opt:
            head_opt.step()
        if on_step is not None:
            on_step("iterate", live, lam)
    for A, B in live.values():
        A.requires_grad_(True)
        B.requires_grad_(True)
    return soft.clone_factors(live), {n: p.detach().clone() for n, p in task.head().items()}, float(
        np.mean(losses))


def encode_update(cfg: RunConfig, glob: dict, local: dict, keep: int, t: int, k: int) -> bytes:
    """Client k's uplink payload in round t for the SOFT wire strategies: the ``keep`` components
    SOFT selects (``random``: seeded random ones; ``fedit``/``ideal``: keep = r), as bytes."""
    if cfg.strategy == "random":
        gen = torch.Generator().manual_seed(_seed(cfg.seed, 41, t, k))
        upd = soft.random_components(glob, local, int(keep), gen)
    else:
        upd = soft.sparsify(glob, local, int(keep), scope=cfg.scope if cfg.strategy != "fedit" else "module")
    return upd.encode()


def _spectral_norm_max(factors: dict) -> float:
    """max over modules of ‖A_ℓ‖₂ and ‖B_ℓ‖₂ (the ball the bound's constants hold on)."""
    with torch.no_grad():
        return max(float(torch.linalg.matrix_norm(X.detach().double(), ord=2)) for pair in factors.values()
                   for X in pair)


def _write(live: dict, values: dict) -> None:
    with torch.no_grad():
        for name, target in live.items():
            src = values[name]
            if isinstance(target, tuple):
                target[0].copy_(src[0])
                target[1].copy_(src[1])
            else:
                target.copy_(src)


def run(config: RunConfig, *, resume: bool = False, progress: bool = True, client_hook=None) -> History:
    """Run (or resume) a federated LoRA fine-tuning with the wireless ledger.

    Args:
        config: the run's :class:`RunConfig`; results go to ``config.out``.
        resume: continue from ``config.out/checkpoint.pt`` (same config, possibly more rounds).
        progress: show a tqdm bar over rounds (accuracy, uplink bits so far, queue).
        client_hook: ``hook(round, client)`` called before each client trains; an exception
            raised there marks the client failed for that round (used to test faults).

    Returns:
        The :class:`History` (also saved to ``config.out``).

    Raises:
        RunFailed: a non-finite loss; the last checkpoint in ``config.out`` is left intact.
    """
    from tqdm.auto import tqdm

    cfg = config
    out = Path(cfg.out)
    r = _Run(cfg, client_hook)
    if resume:
        if not (out / "checkpoint.pt").is_file():
            raise FileNotFoundError(f"cannot resume: no checkpoint.pt in {out}")
        r.load_checkpoint(out)
    if r.round == 0 and "initial_test_loss" not in r.history.meta:  # the start point, for the bound's curves
        _write(r.task.factors(), r.glob)
        _write(r.task.head(), r.ghead)
        r.history.meta["initial_test_loss"], r.history.meta["initial_accuracy"] = r.task.evaluate()
        if hasattr(r.task, "objective"):
            r.history.meta["initial_objective"] = r.task.objective(r.p)[0]
    bar = tqdm(range(r.round, cfg.rounds), initial=r.round, total=cfg.rounds, disable=not progress,
               desc=f"{cfg.strategy}/{cfg.task}", unit="round", leave=False)
    for _ in bar:
        row = r.step()
        metric = {"acc": f"{row['accuracy']:.3f}"} if cfg.task != "linear" else {"loss": f"{row['test_loss']:.4f}"}
        bar.set_postfix(**metric, Mbit=f"{r.history.total_uplink_bits / 1e6:.1f}",
                        Q=f"{row['queue_s']:.2f}" if not math.isnan(row["queue_s"]) else "-")
        if r.round % cfg.checkpoint_every == 0 or r.round == cfg.rounds:
            r.save_checkpoint(out)
            r.history.save(out)
    bar.close()
    r.history.save(out)
    return r.history
