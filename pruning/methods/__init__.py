"""The built-in pruning methods; importing this package registers each of them."""

from pruning.methods import (
    cls_visual,
    fastv,
    prumerge,
    random_subset,
    sparsevlm,
    spatial,
    text_visual,
    trim,
    visionzip,
)

__all__ = ["cls_visual", "fastv", "prumerge", "random_subset", "sparsevlm", "spatial", "text_visual", "trim",
           "visionzip"]
