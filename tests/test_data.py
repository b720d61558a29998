"""Data: the bundled benchmark, local file formats and schema errors, answer-only batching."""

from __future__ import annotations

import hashlib
import json

import datasets
import pytest
import torch
from helpers import tiny_tokenizer

from wagle.data import (
    IGNORE_INDEX,
    encode_qa,
    generate_benchmark,
    generate_rows,
    load_dataset_file,
    make_dataloader,
    write_benchmark,
)


def digest(paths):
    return {name: hashlib.sha256(open(path, "rb").read()).hexdigest() for name, path in paths.items()}


def test_benchmark_is_byte_identical_across_runs(tmp_path):
    first = digest(write_benchmark(str(tmp_path / "a")))
    second = digest(write_benchmark(str(tmp_path / "b")))
    assert first == second and len(first) == 8
    assert digest(write_benchmark(str(tmp_path / "c"), seed=1)) != first


def test_benchmark_splits_are_nested_and_disjoint():
    rows = generate_rows(num_authors=100)
    authors = lambda split: {r["author"] for r in rows[split]}  # noqa: E731
    assert len(authors("forget01")) == 1 and len(authors("forget05")) == 5 and len(authors("forget10")) == 10
    assert authors("forget01") <= authors("forget05") <= authors("forget10")
    for forget, retain in (("forget01", "retain99"), ("forget05", "retain95"), ("forget10", "retain90")):
        assert not authors(forget) & authors(retain)
        assert authors(forget) | authors(retain) == authors("full")
    general_questions = {r["question"] for r in rows["general"]}
    assert not general_questions & {r["question"] for r in rows["full"]}
    for row in rows["full"] + rows["general"]:
        assert len(row["perturbed_answer"]) == 3 and row["answer"] not in row["perturbed_answer"]
    bench = generate_benchmark(num_authors=20)
    assert isinstance(bench, datasets.DatasetDict) and bench["full"].num_rows == 100


@pytest.fixture
def qa_rows():
    return generate_rows(num_authors=10)["forget10"][:4]


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet", "saved"])
def test_every_file_format_loads(tmp_path, qa_rows, fmt):
    ds = datasets.Dataset.from_list(qa_rows)
    path = tmp_path / f"data.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(qa_rows))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in qa_rows))
    elif fmt == "csv":
        ds.map(lambda r: {"perturbed_answer": json.dumps(r["perturbed_answer"])}).to_csv(str(path))
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
    loaded = load_dataset_file(path, role="forget")
    assert loaded.num_rows == 4
    assert loaded[0]["question"] == qa_rows[0]["question"]
    assert loaded[0]["perturbed_answer"] == qa_rows[0]["perturbed_answer"]


def test_text_schema(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "a passage to forget"}\n{"text": "another one"}\n')
    assert load_dataset_file(path, role="forget").num_rows == 2
    with pytest.raises(ValueError, match="missing required column"):
        load_dataset_file(path, schema="qa", role="forget")


def test_schema_and_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="forget data"):
        load_dataset_file(tmp_path / "missing.jsonl", role="forget")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "completion": "y"}\n')
    with pytest.raises(ValueError, match="'question' and 'answer'"):
        load_dataset_file(bad, role="retain")
    empty_answer = tmp_path / "empty_answer.jsonl"
    empty_answer.write_text('{"question": "q?", "answer": ""}\n')
    with pytest.raises(ValueError, match="row 0"):
        load_dataset_file(empty_answer)
    empty = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"question": [], "answer": []}).to_parquet(str(empty))
    with pytest.raises(ValueError, match="forget set is empty"):
        load_dataset_file(empty, role="forget")
    weird = tmp_path / "data.txt"
    weird.write_text("hello")
    with pytest.raises(ValueError, match="unsupported extension"):
        load_dataset_file(weird)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="could not read"):
        load_dataset_file(broken)
    csv_bad_list = tmp_path / "list.csv"
    csv_bad_list.write_text("question,answer,perturbed_answer\nq?,a,not a list\n")
    with pytest.raises(ValueError, match="list of strings"):
        load_dataset_file(csv_bad_list)


def test_answer_only_labels_and_padding(qa_rows):
    tok = tiny_tokenizer()
    encoded = encode_qa(tok, qa_rows[0]["question"], qa_rows[0]["answer"])
    labels = encoded["labels"]
    first_answer = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    prompt_text = tok.decode(encoded["input_ids"][:first_answer], skip_special_tokens=True)
    answer_text = tok.decode(labels[first_answer:], skip_special_tokens=True)
    assert prompt_text.strip().endswith("Answer:") and answer_text.strip() == qa_rows[0]["answer"]
    assert labels[-1] == tok.eos_token_id
    loader = make_dataloader(qa_rows, tok, batch_size=3)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["example_index"].tolist() == [0, 1, 2]
    pads = batch["attention_mask"] == 0
    assert bool((batch["labels"][pads] == IGNORE_INDEX).all())
    assert bool((batch["input_ids"][pads] == tok.pad_token_id).all())
    shuffled = [
        b["example_index"].tolist() for b in make_dataloader(qa_rows, tok, batch_size=2, shuffle=True, seed=3)
    ]
    again = [
        b["example_index"].tolist() for b in make_dataloader(qa_rows, tok, batch_size=2, shuffle=True, seed=3)
    ]
    assert shuffled == again
    with pytest.raises(ValueError, match="batch_size"):
        make_dataloader(qa_rows, tok, batch_size=0)


def test_text_batches_train_on_every_token():
    tok = tiny_tokenizer()
    batch = next(iter(make_dataloader([{"text": "Where was it born?"}], tok, batch_size=1)))
    assert torch.equal(batch["labels"], batch["input_ids"])
