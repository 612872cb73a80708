"""One bounded cache for compiled solver programs (cvxpy problems keyed by their shape).

A program compiled once per shape is reused with new parameter values (cvxpy DPP); the cache
keeps the most recently used ``maxsize`` programs, so long runs over many shapes stay bounded.
"""

from __future__ import annotations

import functools

__all__ = ["PROGRAM_CACHE_SIZE", "cached_program"]

#: Programs kept per builder (least recently used ones are dropped).
PROGRAM_CACHE_SIZE = 16


def cached_program(builder):
    """Decorator: memoise ``builder(*shape)`` in a bounded LRU cache (``builder.cache_clear()``
    empties it)."""
    return functools.lru_cache(maxsize=PROGRAM_CACHE_SIZE)(builder)
