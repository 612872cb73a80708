"""soft: sparsified orthogonal LoRA updates (spec §3–4) on plain (A, B) tensors.

A factor set is a mapping ``module name -> (A, B)`` with A r×n and B m×r. Clients train
with :func:`orthogonality_penalty`, rank their components by :func:`component_importance`
(vector norms only), report :func:`error_profile`, and send :func:`sparsify`'s
:class:`RankSparseUpdate` as bytes (:meth:`RankSparseUpdate.encode`, :func:`decode`). The
server :func:`aggregate` s rank-wise and may :func:`reorthogonalize_factors` the global
factors (B·A unchanged); :func:`update_norm` is the norm it can screen updates by. Every
codec refuses values that are not finite (or, in float16, out of range).
:func:`quantise` sends the kept values at 8 or 4 bits (unbiased stochastic rounding, a scale
per component; :func:`decode_quantised`). :func:`covariance_norm` measures what separate
averaging loses.

Section references (spec §N) are to docs/spec.md, the project's statement of its model.
"""

from soft.baselines import (
    ffa_update,
    product_error,
    product_error_dense,
    random_components,
    svd_truncation_dense,
    svd_truncation_qr,
    topk_elementwise,
)
from soft.covariance import covariance_norm, covariance_norm_dense, factors_covariance_norm
from soft.factors import (
    clone_factors,
    factors_penalty,
    orthogonality_defect,
    orthogonality_penalty,
    reorthogonalize,
    reorthogonalize_factors,
    shape_of,
)
from soft.importance import component_importance, dropped_error, error_profile, select_top, update_energy
from soft.optim import TensorwiseAdam
from soft.peft_io import read_lora, write_lora
from soft.quantise import QuantisedUpdate, decode_quantised, quantise, rounding_profile
from soft.update import RankSparseUpdate, WireFormatError, aggregate, decode, sparsify, update_norm

__all__ = [
    "QuantisedUpdate",
    "RankSparseUpdate",
    "decode_quantised",
    "quantise",
    "rounding_profile",
    "TensorwiseAdam",
    "WireFormatError",
    "aggregate",
    "clone_factors",
    "component_importance",
    "covariance_norm",
    "covariance_norm_dense",
    "decode",
    "dropped_error",
    "error_profile",
    "factors_covariance_norm",
    "factors_penalty",
    "ffa_update",
    "orthogonality_defect",
    "orthogonality_penalty",
    "product_error",
    "product_error_dense",
    "random_components",
    "read_lora",
    "reorthogonalize",
    "reorthogonalize_factors",
    "select_top",
    "shape_of",
    "sparsify",
    "svd_truncation_dense",
    "svd_truncation_qr",
    "topk_elementwise",
    "update_energy",
    "update_norm",
    "write_lora",
]
