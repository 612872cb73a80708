"""Input validation: every public entry point turns bad input into a ValueError that names
the argument and the offending value, before any solver sees it. One exception type for
every kind of input mistake (a wrong value and a wrong type alike: booleans, complex
numbers, strings where a real number is meant): ValueError (docs/model.md, "Errors")."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["as_array", "as_scalar", "check_same_length", "real_array"]


def _first_bad(arr: np.ndarray, mask: np.ndarray) -> str:
    idx = np.argwhere(mask)[0]
    where = f"[{', '.join(str(int(i)) for i in idx)}]" if arr.ndim else ""
    return f"{where} = {arr[tuple(idx)].item()!r}"


_NUMERIC = "must be numeric (real numbers, not bool or complex)"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def real_array(name: str, value) -> np.ndarray:
    """A float64 copy of ``value``, which must hold real numbers only: booleans, complex
    numbers, strings and other objects raise ValueError naming the argument."""
    try:
        raw = np.asarray(value)
    except (TypeError, ValueError, OverflowError) as exc:  # ragged nesting, huge ints
        raise ValueError(f"{name} {_NUMERIC}; got {name} = {_short(value)}") from exc
    kind = raw.dtype.kind
    if kind == "O":
        for x in raw.ravel():
            if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
                raise ValueError(f"{name} {_NUMERIC}; got {name} containing {_short(x)}")
    elif kind not in "iuf":
        raise ValueError(f"{name} {_NUMERIC}; got {name} = {_short(value)} (dtype {raw.dtype})")
    elif not isinstance(value, np.ndarray) and raw.ndim > 0:  # a list may mix booleans into numbers
        for x in np.asarray(value, dtype=object).ravel():
            if isinstance(x, (bool, np.bool_, complex, np.complexfloating)):
                raise ValueError(f"{name} {_NUMERIC}; got {name} containing {_short(x)}")
    try:
        with np.errstate(over="ignore"):
            return np.array(raw, dtype=float, copy=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"{name} {_NUMERIC}; got {name} = {_short(value)}") from exc


def as_rng(rng, name: str = "rng") -> np.random.Generator:
    """A Generator from ``rng``: None, a non-negative int seed, a SeedSequence or a Generator;
    anything else is a ValueError naming it."""
    if rng is None or isinstance(rng, (np.random.Generator, np.random.SeedSequence, np.random.BitGenerator)):
        return np.random.default_rng(rng)
    if isinstance(rng, (bool, np.bool_)) or not isinstance(rng, (int, np.integer)) or rng < 0:
        raise ValueError(f"{name} must be None, a non-negative integer seed or a numpy Generator; got {name} = "
                         f"{_short(rng)}")
    return np.random.default_rng(int(rng))


def as_array(
    name: str,
    value,
    *,
    ndim: int | None = 1,
    lower: float | None = None,
    strict: bool = False,
    allow_inf: bool = False,
    allow_empty: bool = False,
    integer: bool = False,
) -> np.ndarray:
    """Copy ``value`` into a read-only float (or int) array and check it.

    ``lower``/``strict``: every entry must be ``>= lower`` (``> lower`` if strict).
    """
    arr = real_array(name, value)
    if ndim is not None and arr.ndim != ndim:
        if ndim == 1 and arr.ndim == 0:
            arr = arr.reshape(1)
        else:
            raise ValueError(f"{name} must be {ndim}-dimensional; got shape {arr.shape}")
    if not allow_empty and arr.size == 0:
        raise ValueError(f"{name} must not be empty")
    bad = np.isnan(arr) if allow_inf else ~np.isfinite(arr)
    if bad.any():
        kind = "not NaN" if allow_inf else "finite"
        raise ValueError(f"{name} must be {kind}; got {name}{_first_bad(arr, bad)}")
    if lower is not None:
        bad = arr <= lower if strict else arr < lower
        if bad.any():
            rel = ">" if strict else ">="
            raise ValueError(f"{name} must be {rel} {lower:g}; got {name}{_first_bad(arr, bad)}")
    if integer:
        bad = arr != np.round(arr)
        if bad.any():
            raise ValueError(f"{name} must be integers; got {name}{_first_bad(arr, bad)}")
        bad = np.abs(arr) > 2**53  # beyond it a float no longer holds every integer (and int64 would wrap)
        if bad.any():
            raise ValueError(f"{name} must be integers of magnitude <= 2**53; got {name}{_first_bad(arr, bad)}")
        arr = arr.astype(np.int64)
    arr.setflags(write=False)
    return arr


def as_scalar(
    name: str,
    value,
    *,
    lower: float | None = None,
    strict: bool = False,
    allow_inf: bool = False,
    integer: bool = False,
):
    """Check a scalar: a real number, finite (unless ``allow_inf``), bounded below."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number (real, not bool or complex); got {name} = {_short(value)}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond the float range
        raise ValueError(f"{name} must be finite; got {name} = {_short(value)}") from None
    if integer and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        iv = int(value)
        if lower is not None and (iv <= lower if strict else iv < lower):
            rel = ">" if strict else ">="
            raise ValueError(f"{name} must be {rel} {lower:g}; got {name} = {_short(value)}")
        if abs(iv) > 2**53:
            raise ValueError(f"{name} must be an integer of at most 2**53; got {name} = {_short(value)}")
        return iv
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{name} must be finite; got {name} = {value!r}")
    if lower is not None and (v <= lower if strict else v < lower):
        rel = ">" if strict else ">="
        raise ValueError(f"{name} must be {rel} {lower:g}; got {name} = {value!r}")
    if integer:
        if v != round(v):
            raise ValueError(f"{name} must be an integer; got {name} = {value!r}")
        return int(round(v))
    return v


def check_same_length(**arrays: Sequence) -> int:
    """All arrays have the same length; return it."""
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"len({k}) = {n}" for k, n in lengths.items())
        raise ValueError(f"mismatched lengths: {desc}")
    return next(iter(lengths.values()))


def as_int_array(name: str, value, lower: int, upper: int, what: str = "") -> np.ndarray:
    """Integers (int or integer-valued float, any shape) in lower..upper, as int64.

    Errors name the argument: "<name> must be integers ..." / "<name> must lie in lower..upper".
    """
    try:
        a = np.asarray(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be integers in {lower}..{upper}; got {name} = {_short(value)}") from None
    if a.dtype.kind not in "iu" and not (a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a))):
        raise ValueError(f"{name} must be integers in {lower}..{upper}; got {name} = {value!r}")
    a = a.astype(np.int64)
    if np.any((a < lower) | (a > upper)):
        raise ValueError(f"{name} must lie in {lower}..{upper}{what}; got {name} = {value!r}")
    return a


def as_int_tuple(name: str, value, lower: int = 1) -> tuple[int, ...]:
    """A sequence of distinct integers ≥ ``lower`` as a tuple; anything else is a ValueError naming ``name``."""
    try:
        out = tuple(as_scalar(name, v, lower=lower, integer=True) for v in value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of integers; got {name} = {value!r}") from None
    if len(set(out)) != len(out):
        raise ValueError(f"{name} must be distinct; got {name} = {value!r}")
    return out
