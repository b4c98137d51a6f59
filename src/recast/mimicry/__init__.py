"""Neural Mimicry: fitting template banks and coefficients to pretrained weights (REFERENCE 3).

Modules, in import order (each imports only those above it):

- ``problem``: ``FitProblem``, ``FitResult`` and ``fidelity``, the weight metrics of any fit;
- ``registry``: ``@register_mimicry(name)`` and ``fit(problems, method, **options)``;
- ``svd``: the closed form (``svd``);
- ``optimise``: the random start, weighted loss and best-state loop the trained fits share;
- ``iterative``: the paper's fit (``iterative``) and the closed form refined by it (``svd+iterative``);
- ``encoder``: weight-to-coefficient encoders (``encoder``, ``vae``);
- ``features``: model-level fidelity, data-driven refinement, the ``fidelity.json`` record;
- ``curve``: the compression curve and its plot;
- ``images``: images for feature fidelity (not imported here: it pulls in the data package).

Importing this package registers every method. It never imports ``recast.model``, which imports it.
"""

from recast.mimicry import encoder, iterative, svd  # noqa: F401  (importing them registers the methods)
from recast.mimicry.curve import compression_curve, layers_per_group, plot_curve, save_curve
from recast.mimicry.features import (
    FIDELITY_FILE,
    MimicModel,
    block_of,
    feature_fidelity,
    fidelity_record,
    fidelity_summary,
    refine_with_data,
    weight_fidelity,
    write_fidelity,
)
from recast.mimicry.iterative import IterativeSettings
from recast.mimicry.problem import FitProblem, FitResult, fidelity
from recast.mimicry.registry import (
    FitMethod,
    fit,
    get_method,
    method_names,
    method_options,
    register_mimicry,
    registered_methods,
    steps_option,
)

__all__ = [
    "FIDELITY_FILE",
    "FitMethod",
    "FitProblem",
    "FitResult",
    "IterativeSettings",
    "MimicModel",
    "block_of",
    "compression_curve",
    "feature_fidelity",
    "fidelity",
    "fidelity_record",
    "fidelity_summary",
    "fit",
    "get_method",
    "layers_per_group",
    "method_names",
    "method_options",
    "plot_curve",
    "refine_with_data",
    "register_mimicry",
    "registered_methods",
    "save_curve",
    "steps_option",
    "weight_fidelity",
    "write_fidelity",
]
