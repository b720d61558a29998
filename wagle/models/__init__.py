"""Models: local Hugging Face causal LMs, tiny test models, fine-tuning (and, re-exported from
:mod:`wagle.demo.models`, the demo's model recipes)."""

from .checkpointing import activation_checkpointing
from .finetune import finetune
from .loading import load_model, save_model
from .tiny import make_tiny_llama, train_tokenizer

_DEMO_NAMES = ("DemoModels", "TinyRecipe", "build_demo_models")


def __getattr__(name: str):
    """The demo's model recipes, from :mod:`wagle.demo.models` on first use (that module imports this
    package's submodules, so a plain import here would be circular)."""
    if name in _DEMO_NAMES:
        import wagle.demo.models

        return getattr(wagle.demo.models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DemoModels",
    "activation_checkpointing",
    "TinyRecipe",
    "build_demo_models",
    "finetune",
    "load_model",
    "make_tiny_llama",
    "save_model",
    "train_tokenizer",
]
