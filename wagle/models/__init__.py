"""Models: local Hugging Face causal LMs, tiny test/demo models, fine-tuning."""

from .checkpointing import activation_checkpointing
from .finetune import DemoModels, TinyRecipe, build_demo_models, finetune
from .loading import load_model, save_model
from .tiny import make_tiny_llama, train_tokenizer

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
