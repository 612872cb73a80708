"""convergence: the convergence bound of SPEC §5 (one pure function per term).

So far: the rank term ε(r) (`convergence.rank`) and its spectrum estimated from a pilot
gradient (`convergence.spectrum`); the bound itself is tracked by the issue
"convergence: the bound as a calculator".
Importable without torch and pyomo.
"""

from convergence.rank import covariance_weighted_spectrum, rank_term
from convergence.spectrum import estimate_spectrum

__all__ = ["rank_term", "covariance_weighted_spectrum", "estimate_spectrum"]
