"""``wagle demo``: the whole pipeline on the bundled author benchmark and a tiny Llama, on a CPU.

* :mod:`wagle.demo.pipeline`: :class:`DemoConfig` and :func:`run` (models, masks, unlearning,
  evaluation, report);
* :mod:`wagle.demo.models`: :class:`TinyRecipe` and :func:`build_demo_models` (the tokenizer, the
  target and the retain model).
"""

from .models import DemoModels, TinyRecipe, build_demo_models
from .pipeline import DemoConfig, run

__all__ = ["DemoConfig", "DemoModels", "TinyRecipe", "build_demo_models", "run"]
