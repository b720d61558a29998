"""Tiny models for tests and the demo: a locally trained tokenizer and a random-init Llama."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from wagle.errors import UserError

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (no download).

    Byte-level pre-tokenization makes decoding an exact inverse of encoding for any text. Special
    tokens: ``<pad>`` (0), ``<s>`` (bos), ``</s>`` (eos), ``<unk>``. Training is deterministic.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 300:
        raise UserError(f"vocab_size: must be an integer >= 300 (256 bytes + specials), got {vocab_size!r}")
    if isinstance(texts, str):
        raise TypeError("texts: expected an iterable of strings, got a single string")
    texts = [t for t in texts if t]
    if not texts:
        raise UserError("texts: no training text given")
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, clean_up_tokenization_spaces=False, **SPECIAL_TOKENS
    )


def make_tiny_llama(
    tokenizer,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_position_embeddings: int = 256,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised Llama sized to ``tokenizer`` (deterministic in ``seed``; untied
    embeddings; the global torch RNG state is left as it was)."""
    for name, value in (
        ("hidden_size", hidden_size),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("intermediate_size", intermediate_size),
        ("max_position_embeddings", max_position_embeddings),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name}: must be a positive integer, got {value!r}")
    if hidden_size % num_heads or (hidden_size // num_heads) % 2:
        raise UserError(
            f"hidden_size: must be a multiple of 2 * num_heads (even rotary head size), got "
            f"hidden_size={hidden_size}, num_heads={num_heads}"
        )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


@dataclass(frozen=True)
class TinyRecipe:
    """Size and fine-tuning schedule of a tiny Llama that memorises a bundled benchmark (the demo's
    defaults: the target reproduces nearly every training answer under greedy decoding, ROUGE-L
    recall 1.0 on retain90 and general, in about 20 s per model on 2 CPU cores)."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 384
    vocab_size: int = 1024
    epochs: int = 20
    lr: float = 3e-3
    batch_size: int = 16
    warmup_ratio: float = 0.1
    num_authors: int = 100

    QUICK_DATA: ClassVar[dict] = {"num_authors": 20}

    @classmethod
    def quick(cls):
        """Seconds, not memorisation: for tests of the pipelines."""
        return cls(
            hidden_size=32, num_layers=1, intermediate_size=64, vocab_size=400, epochs=1, **cls.QUICK_DATA
        )

    def model(self, tokenizer, seed: int) -> LlamaForCausalLM:
        """The recipe's randomly initialised Llama (deterministic in ``seed``)."""
        return make_tiny_llama(
            tokenizer,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            seed=seed,
        )

    def finetune(self, model, tokenizer, data, *, seed: int, progress: bool, desc: str) -> dict[str, float]:
        """:func:`wagle.models.finetune` with the recipe's schedule; returns its statistics."""
        from .finetune import finetune

        return finetune(
            model,
            tokenizer,
            data,
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            warmup_ratio=self.warmup_ratio,
            seed=seed,
            progress=progress,
            desc=desc,
        )


def qa_corpus(benchmark) -> list[str]:
    """Tokenizer training text of a bundled QA benchmark (``full`` and ``general`` splits): every
    prompt+answer, paraphrase and perturbed answer."""
    from wagle.data.format import format_answer, format_question

    texts = []
    for row in benchmark["full"].to_list() + benchmark["general"].to_list():
        texts.append(format_question(row["question"]) + format_answer(row["answer"]))
        texts.append(row["paraphrased_answer"])
        texts.extend(row["perturbed_answer"])
    return texts
