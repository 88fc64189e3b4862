"""pruning: visual-token pruning methods, compared under renumbered (reassign) and original (GAP) position IDs.

    from pruning import make_method, prune_generate
    method = make_method("cls-visual")
    enc = model.encode(images, prompts, **method.encode_options(model))
    out = prune_generate(model, enc, method, "0.5", positions="keep")
"""

import pruning.methods  # noqa: F401  (registers the built-in methods)
from pruning.apply import POSITIONS, prune_generate
from pruning.budget import Budget, parse_budgets
from pruning.registry import (
    METHODS,
    LayerPruningMethod,
    PruningMethod,
    Selection,
    VisionPruning,
    make_method,
    method_spec,
    register_method,
)

__all__ = [
    "METHODS", "POSITIONS", "Budget", "LayerPruningMethod", "PruningMethod", "Selection", "VisionPruning",
    "make_method", "method_spec", "parse_budgets", "prune_generate", "register_method",
]
