"""grounding: REC and VQA data, prompts, box parsing, metrics and resumable evaluation.

    from grounding import load_dataset, run_evaluation, prompt_style
    data = load_dataset("refcoco", "/data/RefCOCO", "val")
    summary = run_evaluation(model, data, "results/refcoco-val", prompt_style("llava-1.5"))
"""

from grounding.boxes import BOX_FORMATS, ParsedBox, answer_to_pixels, center_inside, iou, parse_box
from grounding.data import DATASETS, Dataset, ImageRef, Sample, load_dataset
from grounding.errors import (
    DatasetFormatError,
    GroundingError,
    PromptStyleError,
    RunConfigError,
    SplitNotFoundError,
    UnsafePickleError,
)
from grounding.metrics import THRESHOLDS, bootstrap_intervals, exact_match, normalize_answer
from grounding.prompts import PromptStyle, default_style_for, prompt_style, register_prompt_style
from grounding.runner import Shard, evaluate_batch, model_identity, run_config, run_evaluation
from grounding.summary import summarize

__all__ = [
    "BOX_FORMATS", "DATASETS", "THRESHOLDS", "Dataset", "DatasetFormatError", "GroundingError", "ImageRef",
    "ParsedBox", "PromptStyle", "PromptStyleError", "RunConfigError", "Sample", "Shard", "SplitNotFoundError",
    "UnsafePickleError",
    "answer_to_pixels", "bootstrap_intervals", "center_inside", "default_style_for", "evaluate_batch",
    "exact_match", "iou", "load_dataset", "model_identity", "normalize_answer", "parse_box", "prompt_style",
    "register_prompt_style", "run_config", "run_evaluation", "summarize",
]
