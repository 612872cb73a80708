"""What the loop measures for the convergence bound (docs/theory.md), and the ledger's schema.

Every round the server writes one row (:data:`ROUND_COLUMNS`) and one row per client
(:data:`CLIENT_COLUMNS`) into the :class:`~fedloop.History`. The measurements the bound's
calibration reads (:data:`convergence.calibration.MEASUREMENTS`) are part of the round schema,
so a name the loop writes and the name the calibration reads are one name.

The measurements themselves:

* at the round's start point θ_t (:func:`start_point`): f(θ_t) and ‖∇f(θ_t)‖² where the task
  can compute them exactly (``linear``), and the largest spectral norm of the global factors;
* during each client's local training (:class:`ClientProbe`): its first-step gradient, the
  largest factor norm along its iterates, and (``linear``) its gradient and noise statistics;
* after aggregation (:func:`aggregation_losses`): what separate averaging and sparsification
  lost, in product units of B·A, and the one covariance of the round ‖C_t‖².
"""

from __future__ import annotations

import math

import numpy as np

from convergence.calibration import MEASUREMENTS

__all__ = ["ROUND_COLUMNS", "CLIENT_COLUMNS", "ClientProbe", "start_point", "aggregation_losses",
           "spectral_norm_max"]

#: The per-round ledger: column → meaning (units in brackets). Columns that a run cannot
#: measure (remote clients, tasks without an exact objective) are NaN or absent.
ROUND_COLUMNS: dict[str, str] = {
    "round": "round number, 1-based",
    "latency_s": "the round's latency τ_t [s]: downlink + compute + upload of the last client",
    "wallclock_s": "simulated time so far, Σ τ_t [s]",
    "queue_s": "the Lyapunov queue Q(t) before this round [s] (tsfa; NaN otherwise)",
    "latency_budget_s": "τ̄ [s]",
    "uplink_bits": "bits uploaded by every client this round",
    "downlink_bits": "bits broadcast to the K clients this round",
    "scheduled": "clients whose update was aggregated",
    "dropped": "clients that failed or missed the deadline",
    "train_loss": "mean local training loss of the clients that trained",
    "accuracy": "the task's metric after the round (NaN when not evaluated)",
    "solve_time_s": "wall time of the allocation policy [s]",
    "fallback": "the allocator's fallback, if it used one",
    "mean_value_bits": "mean bits per value of the round's uploads (value_bits, or the allocator's choices for "
                       "'auto'; NaN when nobody sent an adapter)",
    "factor_norm_max": "largest spectral norm of the global factors at θ_t",
    "product_error": "‖W_{t+1} − Σ p̃_k B_k A_k‖² (in-process runs)",
    "sparsification_error": "‖W_{t+1} − B̄Ā‖² (in-process runs)",
    "local_norm_max": "largest factor spectral norm along the local iterates",
    "client_grad_sq_max": "largest client ‖∇f_k‖² (linear)",
    "client_noise_max": "largest client gradient-noise variance (linear)",
    "predicted_loss": "the loss predicted for this round by the run's last re-calibration on its own history "
                      "(convergence.predict_from, every predict_every rounds; NaN before the first)",
    "band_low": "lower end of the prediction's 90 % band",
    "band_high": "upper end of the prediction's 90 % band",
    "outside_band": "1 when the measured loss (loss_curve: objective on linear, else test loss) left the band, "
                    "0 inside, NaN without a prediction",
    **MEASUREMENTS,
}

#: The per-(round, client) ledger: column → meaning.
CLIENT_COLUMNS: dict[str, str] = {
    "round": "round number, 1-based",
    "client": "client index k",
    "status": '"ok", "skipped", "deadline" or "error: ..."',
    "keep": "components sent s_k",
    "uplink_bits": "bits uploaded (adapter payload and head)",
    "downlink_bits": "bits received: the round's broadcast of the global adapter and head",
    "bandwidth_hz": "bandwidth allocated b_k [Hz]",
    "snr_hz": "the round's c_k = B·SNR_k per unit bandwidth [Hz]",
    "compute_s": "local computation time [s]",
    "upload_s": "upload time [s]",
    "finish_s": "downlink + compute + upload [s]",
    "train_loss": "mean local training loss",
    "dropped_energy": "e_k(s_k), the update energy not sent",
    "value_bits": "q_k, bits per value of the client's payload (its allocation with value_bits = 'auto')",
}


def spectral_norm_max(factors: dict) -> float:
    """max over modules of ‖A_ℓ‖₂ and ‖B_ℓ‖₂ (the ball the bound's constants hold on)."""
    import torch

    with torch.no_grad():
        return max(float(torch.linalg.matrix_norm(X.detach().double(), ord=2)) for pair in factors.values()
                   for X in pair)


class ClientProbe:
    """The ``on_step`` hook of :func:`fedloop.client.train_client` for one client: its first-step
    gradient of the task loss alone, the largest factor norm along its iterates and, where the
    task has them, the largest gradient and noise statistics along the way."""

    def __init__(self, task, client: int, batch_size: int):
        self.task, self.client, self.batch_size = task, client, batch_size
        self.norm_max, self.grad = 0.0, None
        self.grad_sq_max = self.noise_max = math.nan

    def __call__(self, kind: str, live: dict, penalty: float) -> None:
        import torch

        import soft

        stats = getattr(self.task, "client_statistics", None)
        if stats is not None:  # at x_0 (kind "gradient") and after every step
            g2, var = stats(self.client, self.batch_size)
            self.grad_sq_max = np.fmax(self.grad_sq_max, g2)
            self.noise_max = np.fmax(self.noise_max, var)
        if kind == "iterate":
            self.norm_max = max(self.norm_max, spectral_norm_max(live))
            return
        params = [p for pair in live.values() for p in pair if p.requires_grad]
        grads = [p.grad.detach().double().clone() for p in params]
        if penalty:  # the task loss's gradient alone: take the penalty's gradient away
            pen = torch.autograd.grad(penalty * soft.factors_penalty(live), params, allow_unused=True)
            grads = [g - (0 if q is None else q.double()) for g, q in zip(grads, pen, strict=True)]
        self.grad = torch.cat([g.flatten() for g in grads])


def start_point(task, global_factors: dict, weights: np.ndarray) -> dict:
    """At θ_t: objective f(θ_t) and gradient_norm_sq ‖∇f(θ_t)‖² (tasks with an exact
    ``objective``; NaN otherwise) and factor_norm_max."""
    out = {"objective": math.nan, "gradient_norm_sq": math.nan, "factor_norm_max": spectral_norm_max(global_factors)}
    if hasattr(task, "objective"):
        task.assign(global_factors)
        out["objective"], out["gradient_norm_sq"] = task.objective(weights)
    return out


def aggregation_losses(server, ok: list, local: list, folded_before: dict, probes: dict) -> dict:
    """What aggregation lost this round, in product units of B·A (folded deltas divided by γ):
    product_error ‖W_{t+1} − Σ p̃_k B_k A_k‖², sparsification_error ‖W_{t+1} − B̄Ā‖² (B̄, Ā the
    weighted means of the trained clients' factors) and covariance_sq ‖C‖² = ‖Σ p̃_k B_k A_k − B̄Ā‖²,
    with p̃ the data weights renormalised over the trained clients ``ok``; plus the first-step
    gradient statistics Σ p̃‖g_k‖² and ‖Σ p̃ g_k‖² and the probes' largest norms."""
    import soft

    out = dict.fromkeys(("product_error", "sparsification_error", "covariance_sq", "grad_sq_mean", "grad_mean_sq",
                         "local_norm_max", "client_grad_sq_max", "client_noise_max"), math.nan)
    if not ok:
        return out
    w = server.weights[ok] / server.weights[ok].sum()
    pe = se = 0.0
    for name in server.names:
        mean_prod = sum(wk * (local[k][name][1].double() @ local[k][name][0].double())
                        for wk, k in zip(w, ok, strict=True))
        Bb = sum(wk * local[k][name][1].double() for wk, k in zip(w, ok, strict=True))
        Ab = sum(wk * local[k][name][0].double() for wk, k in zip(w, ok, strict=True))
        A1, B1 = server.global_factors[name]
        new = B1.double() @ A1.double()
        after, before = server.folded[name], folded_before[name]
        if after is not None:
            new = new + (after.double() - (0 if before is None else before.double())) / server.task.scaling
        pe += float(((new - mean_prod) ** 2).sum())
        se += float(((new - Bb @ Ab) ** 2).sum())
    out["product_error"], out["sparsification_error"] = pe, se
    out["covariance_sq"] = soft.factors_covariance_norm([local[k] for k in ok], w) ** 2 if len(ok) > 1 else 0.0
    grads = [probes[k].grad if k in probes else None for k in ok]
    if all(g is not None for g in grads):
        out["grad_sq_mean"] = float(sum(wk * float(g @ g) for wk, g in zip(w, grads, strict=True)))
        gm = sum(wk * g for wk, g in zip(w, grads, strict=True))
        out["grad_mean_sq"] = float(gm @ gm)
    out["local_norm_max"] = max(probes[k].norm_max if k in probes else 0.0 for k in ok)
    for key, attr in (("client_grad_sq_max", "grad_sq_max"), ("client_noise_max", "noise_max")):
        value = float(np.nanmax([getattr(probes[k], attr) if k in probes else math.nan for k in ok] + [-np.inf]))
        out[key] = value if np.isfinite(value) else math.nan
    return out
