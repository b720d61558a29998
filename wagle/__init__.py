"""wagle: Triton-accelerated WAGLE weight attribution and masked unlearning for LLMs.

mask = wagle.attribute(model, forget_batches, retain_batches, ratio=0.5)        # WAGLE mask
wagle.unlearn(model, forget, retain, tokenizer=tok, method="npo", mask=mask)    # masked NPO
result = wagle.evaluate(model, tok, splits, reference=retain_model)             # TOFU metrics
report = wagle.compare(model, retain_model, tok, forget=f, retain=r, out_dir="study")  # mask study
"""

from .attribution import attribute, mask_from_gradients
from .comparison import compare
from .errors import UserError
from .evaluation import EvaluationResult, evaluate
from .mask import MaskFileError, MaskMismatchError, PartialMaskWarning, WeightMask
from .mask_plot import layer_densities, plot_mask_densities
from .optim import MaskedAdamW, MaskedSGD, StepInBackward
from .unlearning import UnlearningDiverged, UnlearnResult, unlearn

__version__ = "0.1.0"

__all__ = [
    "EvaluationResult",
    "MaskFileError",
    "MaskMismatchError",
    "MaskedAdamW",
    "MaskedSGD",
    "PartialMaskWarning",
    "StepInBackward",
    "UnlearnResult",
    "UnlearningDiverged",
    "UserError",
    "WeightMask",
    "__version__",
    "attribute",
    "compare",
    "evaluate",
    "layer_densities",
    "mask_from_gradients",
    "plot_mask_densities",
    "unlearn",
]
