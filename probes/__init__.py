"""probes: layer-wise linear probes that read patch position from every vision-tower layer.

    python -m probes.layerwise --model /ckpt/llava-1.5-7b-hf --images my_images/ --out results/probe-7b

    from probes import PositionProbe
    probe = PositionProbe(grid=(24, 24), target="index").fit(X_train, index_train)
"""

from probes.estimator import PositionProbe, fit_layers, patch_scores
from probes.targets import METRICS, TARGETS, chance, patch_labels, target_values

__all__ = ["METRICS", "TARGETS", "PositionProbe", "chance", "fit_layers", "patch_labels", "patch_scores",
           "target_values"]
