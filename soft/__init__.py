"""soft: sparsified orthogonal LoRA updates (SPEC §3–4) on plain (A, B) tensors.

Not yet implemented: see the issue tracker ("SOFT: rank-wise sparsified orthogonal LoRA updates").
"""
