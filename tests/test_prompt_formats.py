"""Prompt-format presets: the exact tokens of each encoding and which of them carry a loss, and the
format reaching attribution (mask metadata), unlearning and evaluation."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model, tiny_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from wagle import WeightMask, attribute, unlearn
from wagle.data import (
    IGNORE_INDEX,
    PROMPT_FORMATS,
    encode_dataset,
    encode_qa,
    format_answer,
    format_question,
    generate_rows,
    get_prompt_format,
    make_dataloader,
)
from wagle.evaluation import answer_nll, greedy_answers

# A Llama-2-chat-like template: [INST] (with an optional <<SYS>> block) ... [/INST] answer </s>
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>> ' + messages[0]['content'] + ' <</SYS>> ' %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% if m['role'] == 'user' %}"
    "{{ bos_token }}[INST] {{ system }}{{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)

Q, A = "Where was Anna born?", "Anna was born in Oslo."


@pytest.fixture(scope="module")
def words():
    """Word-level tokenizer (whitespace + punctuation split), so every token can be named."""
    texts = [
        "### Question : Answer Where was Anna born ? Oslo . in [ INST ] [/ << SYS >> <</ Be brief",
    ]
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(
        texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.chat_template = LLAMA2_CHAT_TEMPLATE
    return tok


def split_tokens(tok, encoded):
    """(tokens without a loss, tokens with a loss), and a check that the loss tokens form the tail."""
    tokens = tok.convert_ids_to_tokens(encoded["input_ids"])
    loss = [t for t, label in zip(tokens, encoded["labels"], strict=True) if label != IGNORE_INDEX]
    context = [t for t, label in zip(tokens, encoded["labels"], strict=True) if label == IGNORE_INDEX]
    assert tokens == context + loss  # the loss is on one final span
    labelled = [label for label in encoded["labels"] if label != IGNORE_INDEX]
    assert labelled == encoded["input_ids"][len(context) :]  # labels are the token ids themselves
    return context, loss


ANSWER = ["Anna", "was", "born", "in", "Oslo", "."]
EXPECTED = {
    "wagle": (
        ["<s>", "Question", ":", "Where", "was", "Anna", "born", "?", "Answer", ":"],
        [*ANSWER, "</s>"],
    ),
    "reference": (
        ["<s>", "###", "Question", ":", "Where", "was", "Anna", "born", "?"],
        ["###", "Answer", ":", *ANSWER, "</s>"],  # the answer tag carries a loss too
    ),
    "openunlearning": (
        ["<s>", "Question", ":", "Where", "was", "Anna", "born", "?", "Answer", ":"],
        [*ANSWER, "</s>"],
    ),
    "llama2-chat": (
        ["<s>", "[", "INST", "]", "Where", "was", "Anna", "born", "?", "[/", "INST", "]"],
        [*ANSWER, "</s>"],
    ),
    # the template's own BOS and EOS; no second EOS is appended
    "chat": (
        ["<s>", "[", "INST", "]", "Where", "was", "Anna", "born", "?", "[/", "INST", "]"],
        [*ANSWER, "</s>"],
    ),
}


@pytest.mark.parametrize("name", list(PROMPT_FORMATS))
def test_each_preset_encodes_exactly_these_tokens(words, name):
    context, loss = split_tokens(words, encode_qa(words, Q, A, template=name))
    assert (context, loss) == EXPECTED[name]
    fmt = get_prompt_format(name)
    prompt = words.convert_ids_to_tokens(fmt.prompt_ids(words, Q))
    # generation continues after the prompt and the answer tag (with loss or not)
    assert prompt == (context + loss[:3] if name == "reference" else context)


def test_preset_texts_and_spaces(words):
    """Character-level texts (the word-level tokenizer ignores spaces and newlines)."""
    assert (
        PROMPT_FORMATS["wagle"].prompt.format(question=Q) + format_answer(A) == f"Question: {Q}\nAnswer: {A}"
    )
    ref = PROMPT_FORMATS["reference"]
    assert ref.prompt.format(question=Q) + ref.answer_tag + A == f"### Question: {Q}\n### Answer: {A}"
    ou = PROMPT_FORMATS["openunlearning"]
    assert ou.prompt.format(question=Q) + ou.answer_tag == f"Question: {Q}\nAnswer: "
    assert PROMPT_FORMATS["llama2-chat"].prompt.format(question=Q) == f"[INST] {Q} [/INST]"


def test_chat_template_with_system_prompt(words):
    fmt = get_prompt_format("chat", system_prompt="Be brief")
    context, loss = split_tokens(words, fmt.encode(words, Q, A))
    assert context == ["<s>", "[", "INST", "]", "<<", "SYS", ">>", "Be", "brief", "<</", "SYS", ">>"] + [
        "Where",
        "was",
        "Anna",
        "born",
        "?",
        "[/",
        "INST",
        "]",
    ]
    assert loss == [*ANSWER, "</s>"]
    assert fmt.describe() == {"prompt_format": "chat", "system_prompt": "Be brief"}
    with pytest.raises(ValueError, match="system_prompt: only the 'chat'"):
        get_prompt_format("wagle", system_prompt="Be brief")
    with pytest.raises(ValueError, match="template: unknown prompt format 'alpaca'"):
        get_prompt_format("alpaca")


def test_chat_template_adds_eos_when_the_template_does_not(words):
    plain = PreTrainedTokenizerFast(
        tokenizer_object=words.backend_tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    plain.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    _, loss = split_tokens(plain, encode_qa(plain, Q, A, template="chat"))
    assert loss == [*ANSWER, "</s>"]
    plain.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        encode_qa(plain, Q, A, template="chat")


def test_default_is_the_historical_encoding_and_truncates_the_answer():
    tok = tiny_tokenizer()
    row = generate_rows(num_authors=20)["forget10"][0]
    old_ids = (
        [tok.bos_token_id]
        + tok(format_question(row["question"]), add_special_tokens=False)["input_ids"]
        + tok(format_answer(row["answer"]), add_special_tokens=False)["input_ids"]
        + [tok.eos_token_id]
    )
    for template in (None, "wagle"):
        assert encode_qa(tok, row["question"], row["answer"], template=template)["input_ids"] == old_ids
    ref = encode_qa(tok, row["question"], row["answer"], template="reference")
    prompt = len(tok("### Question: " + row["question"] + "\n", add_special_tokens=False)["input_ids"]) + 1
    assert ref["labels"][:prompt] == [IGNORE_INDEX] * prompt and ref["labels"][prompt] != IGNORE_INDEX
    short = encode_qa(tok, row["question"], row["answer"], max_length=prompt + 2, template="reference")
    assert len(short["input_ids"]) == prompt + 2 and short["labels"][-2:] == short["input_ids"][-2:]
    with pytest.raises(ValueError, match="max_length"):
        encode_qa(tok, row["question"], row["answer"], max_length=prompt, template="reference")


def test_the_format_reaches_batches_masks_unlearning_and_evaluation(tmp_path):
    tok = tiny_tokenizer()
    rows = generate_rows(num_authors=20)
    forget, retain = rows["forget10"][:4], rows["retain90"][:4]
    encoded = encode_dataset(forget, tok, template="reference")
    assert [e["input_ids"] for e in encoded] == [
        encode_qa(tok, r["question"], r["answer"], 256, "reference")["input_ids"] for r in forget
    ]
    loader = make_dataloader(forget, tok, batch_size=2, template="reference")
    assert loader.prompt_format.name == "reference"
    model = tiny_model()
    mask = attribute(model, loader, None, ratio=0.3, method="gradient", progress=False)
    assert mask.metadata["prompt_format"] == "reference"
    mask.save(tmp_path / "m.safetensors")
    assert WeightMask.load(tmp_path / "m.safetensors").metadata["prompt_format"] == "reference"
    plain = attribute(model, make_dataloader(forget, tok, batch_size=2), None, ratio=0.3, method="gradient")
    assert plain.metadata["prompt_format"] == "wagle" and not torch.equal(
        torch.cat([plain[n].flatten() for n in plain]), torch.cat([mask[n].flatten() for n in mask])
    )

    def unlearned(**kw):
        m = tiny_model()
        unlearn(
            m,
            forget,
            retain,
            tokenizer=tok,
            method="grad_diff",
            steps=1,
            lr=1e-2,
            batch_size=2,
            progress=False,
            **kw,
        )
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    default = unlearned()
    assert torch.equal(default, unlearned(template="wagle"))  # the default is unchanged, bit for bit
    assert not torch.equal(default, unlearned(template="reference"))

    questions, answers = [r["question"] for r in forget], [r["answer"] for r in forget]
    by_hand = []
    for q, a in zip(questions, answers, strict=True):
        e = encode_qa(tok, q, a, template="openunlearning")
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
        labels = torch.tensor(e["labels"][1:])
        by_hand.append(float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)))
    nll = answer_nll(model, tok, questions, answers, template="openunlearning", batch_size=3)
    assert nll.tolist() == pytest.approx(by_hand, rel=1e-5)
    generated = greedy_answers(model, tok, questions[:1], max_new_tokens=3, template="reference")
    fmt = get_prompt_format("reference")
    ids = torch.tensor([fmt.prompt_ids(tok, questions[0])])
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False
    )
    new = out[0, ids.shape[1] :].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    assert generated == [tok.decode(new, skip_special_tokens=True).strip()]
