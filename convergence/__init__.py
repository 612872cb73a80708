"""convergence: the convergence bound of SPEC §5 (one pure function per term).

Not yet implemented: see the issue tracker ("convergence: the bound as a calculator").
Importable without torch and pyomo.
"""
