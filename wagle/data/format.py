"""Prompt formats and tokenization conventions shared by attribution, unlearning and evaluation.

A QA pair is encoded as ``[BOS] prompt tag answer EOS``, each piece tokenized on its own (so the
boundaries are exact whatever the tokenizer merges), with a loss on the answer tokens and EOS only
(the prompt, and the answer tag unless the format says otherwise, are labelled ``-100``). Greedy
generation continues ``[BOS] prompt tag``. Named presets (:data:`PROMPT_FORMATS`):

* ``wagle`` (default): ``"Question: {q}\\nAnswer:"`` then ``" {a}"``;
* ``reference``: the WAGLE reference code's ``"### Question: {q}\\n"`` then the tag
  ``"### Answer: "`` (with a loss on the tag tokens too) then ``"{a}"``;
* ``openunlearning``: OpenUnlearning's base-model format ``"Question: {q}\\n"`` + ``"Answer: "``
  then ``"{a}"``;
* ``llama2-chat``: OpenUnlearning's Llama-2-chat format ``"[INST] {q} [/INST]"`` then ``"{a}"``;
* ``chat``: the tokenizer's own chat template (``apply_chat_template``; an optional system
  message). The prompt is the rendered conversation up to the generation prompt, the target is the
  rest of the rendered conversation (the answer and the template's end-of-turn text), plus EOS when
  the template does not end with it. No BOS is added: chat templates write their own.

Plain-text examples (corpus-style forgetting) carry a loss on every token, whatever the format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from wagle.errors import UserError

IGNORE_INDEX = -100
QUESTION_TEMPLATE = "Question: {question}\nAnswer:"
DEFAULT_PROMPT_FORMAT = "wagle"


@dataclass(frozen=True)
class PromptFormat:
    """How a question and its answer become tokens.

    ``prompt`` (with a ``{question}`` field) and ``answer_tag`` form the generation prompt;
    ``answer_prefix`` precedes the answer text; ``loss_on_tag`` puts a loss on the tag's tokens;
    ``chat`` uses the tokenizer's chat template instead (``system_prompt`` adds a system message).
    """

    name: str
    prompt: str = QUESTION_TEMPLATE
    answer_tag: str = ""
    answer_prefix: str = " "
    loss_on_tag: bool = False
    chat: bool = False
    system_prompt: str | None = None

    def describe(self) -> dict[str, str]:
        """What reports and mask metadata record: the name, and the system prompt when there is one."""
        out = {"prompt_format": self.name}
        if self.system_prompt:
            out["system_prompt"] = self.system_prompt
        return out

    # ------------------------------------------------------------------------------------- pieces
    def _messages(self, question: str) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*messages, {"role": "user", "content": question.strip()}]

    def _chat_texts(self, tokenizer, question: str, answer: str | None) -> tuple[str, str]:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                "template: 'chat' needs a tokenizer with a chat template (tokenizer.chat_template)"
            )
        messages = self._messages(question)
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if answer is None:
            return prompt, ""
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": answer.strip()}],
            tokenize=False,
            add_generation_prompt=False,
        )
        if not full.startswith(prompt):
            raise UserError(
                "template: the chat template's conversation does not start with its generation prompt; "
                "the answer cannot be separated from the prompt"
            )
        return prompt, full[len(prompt) :]

    def _ids(self, tokenizer, text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def prompt_ids(self, tokenizer, question: str) -> list[int]:
        """The token ids a model continues to answer ``question`` (BOS, prompt and tag)."""
        if self.chat:
            return self._ids(tokenizer, self._chat_texts(tokenizer, question, None)[0])
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        text = self.prompt.format(question=question.strip())
        return bos + self._ids(tokenizer, text) + self._ids(tokenizer, self.answer_tag)

    def encode(self, tokenizer, question: str, answer: str, max_length: int = 512) -> dict[str, list[int]]:
        """Token ids and labels of one QA pair (``-100`` where there is no loss).

        The target (answer, EOS, and the tag with ``loss_on_tag``) is truncated, never the prompt,
        to fit ``max_length``; EOS is appended when it fits.
        """
        eos = tokenizer.eos_token_id
        if self.chat:
            prompt_text, rest = self._chat_texts(tokenizer, question, answer)
            context, target = self._ids(tokenizer, prompt_text), self._ids(tokenizer, rest)
            if eos is not None and (not target or target[-1] != eos):
                target.append(eos)
        else:
            bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            context = bos + self._ids(tokenizer, self.prompt.format(question=question.strip()))
            tag = self._ids(tokenizer, self.answer_tag)
            target = self._ids(tokenizer, self.answer_prefix + answer.strip())
            target = target + ([eos] if eos is not None else [])
            if self.loss_on_tag:
                target = tag + target
            else:
                context = context + tag
        room = max_length - len(context)
        if room <= 0:
            raise UserError(
                f"max_length={max_length} leaves no room for the answer: the prompt alone has "
                f"{len(context)} tokens"
            )
        target = target[:room]
        return {"input_ids": context + target, "labels": [IGNORE_INDEX] * len(context) + target}


PROMPT_FORMATS: dict[str, PromptFormat] = {
    "wagle": PromptFormat("wagle"),
    "reference": PromptFormat(
        "reference",
        prompt="### Question: {question}\n",
        answer_tag="### Answer: ",
        answer_prefix="",
        loss_on_tag=True,
    ),
    "openunlearning": PromptFormat(
        "openunlearning", prompt="Question: {question}\n", answer_tag="Answer: ", answer_prefix=""
    ),
    "llama2-chat": PromptFormat("llama2-chat", prompt="[INST] {question} [/INST]", answer_prefix=""),
    "chat": PromptFormat("chat", chat=True),
}


def get_prompt_format(
    template: str | PromptFormat | None = None, *, system_prompt: str | None = None
) -> PromptFormat:
    """The :class:`PromptFormat` for a preset name (``None``: ``"wagle"``) or a format itself;
    ``system_prompt`` applies to the ``chat`` preset only."""
    if isinstance(template, PromptFormat):
        fmt = template
    elif template is None or isinstance(template, str):
        name = DEFAULT_PROMPT_FORMAT if template is None else template
        if name not in PROMPT_FORMATS:
            raise UserError(
                f"template: unknown prompt format {name!r}; expected one of {list(PROMPT_FORMATS)}"
            )
        fmt = PROMPT_FORMATS[name]
    else:
        raise UserError(f"template: expected a preset name or a PromptFormat, got {type(template).__name__}")
    if system_prompt is not None:
        if not isinstance(system_prompt, str) or not system_prompt.strip():
            raise UserError(f"system_prompt: must be a non-empty string, got {system_prompt!r}")
        if not fmt.chat:
            raise UserError(
                f"system_prompt: only the 'chat' prompt format has a system prompt, not {fmt.name!r}"
            )
        fmt = replace(fmt, system_prompt=system_prompt)
    return fmt


def format_question(question: str) -> str:
    """The default (``wagle``) prompt for ``question``; generation continues after it."""
    return QUESTION_TEMPLATE.format(question=question.strip())


def format_answer(answer: str) -> str:
    """The default (``wagle``) answer continuation (a leading space, no EOS)."""
    return " " + answer.strip()


def encode_qa(
    tokenizer, question: str, answer: str, max_length: int = 512, template: str | PromptFormat | None = None
) -> dict[str, list[int]]:
    """Token ids and labels for one QA pair in prompt format ``template`` (default ``wagle``);
    labels are ``-100`` on prompt tokens. See :meth:`PromptFormat.encode`."""
    return get_prompt_format(template).encode(tokenizer, question, answer, max_length)


def encode_text(tokenizer, text: str, max_length: int = 512) -> dict[str, list[int]]:
    """Token ids and labels for a plain-text example: every token is a target."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    ids = ids[:max_length]
    return {"input_ids": ids, "labels": list(ids)}


def pad_batch(examples: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    if not examples:
        raise UserError("examples: cannot pad an empty batch")
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
