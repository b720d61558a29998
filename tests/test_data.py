"""Data: the bundled benchmark, local file formats and schema errors, answer-only batching."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys

import datasets
import pytest
import torch
from helpers import tiny_tokenizer

import wagle.synthetic.authors as benchmark_module
from wagle.data import (
    IGNORE_INDEX,
    RETAIN_OF,
    SPLITS,
    benchmark_split,
    encode_dataset,
    encode_qa,
    generate_benchmark,
    generate_rows,
    load_dataset_file,
    make_dataloader,
    validate_dataset,
    write_benchmark,
)


def digest(paths):
    return {name: hashlib.sha256(open(path, "rb").read()).hexdigest() for name, path in paths.items()}


# ----------------------------------------------------------------------------------------- benchmark


def test_benchmark_is_byte_identical_across_calls(tmp_path):
    first = digest(write_benchmark(str(tmp_path / "a")))
    second = digest(write_benchmark(tmp_path / "b"))
    assert first == second and set(first) == set(SPLITS)
    assert digest(write_benchmark(str(tmp_path / "c"), seed=1)) != first
    assert not [f for f in os.listdir(tmp_path / "a") if f.startswith(".tmp")]
    write_benchmark(str(tmp_path / "a"))  # overwriting in place is safe and gives the same bytes
    assert digest({n: tmp_path / "a" / f"{n}.jsonl" for n in SPLITS}) == first
    raw = (tmp_path / "a" / "forget10.jsonl").read_bytes()
    assert raw.isascii() and raw.endswith(b"\n") and b"\r" not in raw
    assert len(raw.splitlines()) == 50


def test_benchmark_is_byte_identical_in_another_process(tmp_path):
    """A fresh interpreter with another hash seed writes the same bytes (the module is loaded from its
    file, without the heavy package import, to keep this fast)."""
    here = digest(write_benchmark(str(tmp_path / "here")))
    script = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('bench', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "module.write_benchmark(sys.argv[2])\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run(
        [sys.executable, "-c", script, benchmark_module.__file__, str(tmp_path / "there")],
        check=True,
        env=env,
        timeout=120,
    )
    assert digest({n: tmp_path / "there" / f"{n}.jsonl" for n in SPLITS}) == here


def test_benchmark_splits_are_nested_and_disjoint():
    rows = generate_rows(num_authors=100)
    authors = lambda split: [r["author"] for r in rows[split]]  # noqa: E731
    ordered = list(dict.fromkeys(authors("full")))
    assert len(ordered) == 100 and len(rows["full"]) == 500
    for split, count in (("forget01", 1), ("forget05", 5), ("forget10", 10)):
        assert list(dict.fromkeys(authors(split))) == ordered[-count:]  # the LAST authors, as in TOFU
    assert set(authors("forget01")) <= set(authors("forget05")) <= set(authors("forget10"))
    for forget, retain in (("forget01", "retain99"), ("forget05", "retain95"), ("forget10", "retain90")):
        assert not set(authors(forget)) & set(authors(retain))
        assert rows[retain] + rows[forget] == rows["full"]
    general_text = json.dumps(rows["general"])
    assert not any(name in general_text for name in ordered)
    assert not {r["question"] for r in rows["general"]} & {r["question"] for r in rows["full"]}
    for row in rows["full"] + rows["general"]:
        assert set(row) >= {"question", "answer", "paraphrased_answer", "perturbed_answer", "author"}
        wrong = row["perturbed_answer"]
        assert len(wrong) == 3 and len(set(wrong)) == 3
        assert row["answer"] not in wrong and row["paraphrased_answer"] not in wrong
    for seed in range(4):  # every seed: three distinct wrong answers
        for row in generate_rows(num_authors=100, seed=seed)["full"]:
            assert len(set(row["perturbed_answer"])) == 3


# What each question asks and where its fact sits in the answer and in the paraphrase (the perturbed
# answers are the paraphrase with a wrong fact); "{s}" is the question's subject (author or country).
FACT_TEMPLATES = (
    (r"Where was (.+) born\?", r"{s} was born in (.+)\.", r"The birthplace of {s} is the town of (.+)\."),
    (
        r"What genre is (.+) known for\?",
        r"{s} is known for writing (.+)\.",
        r"{s} mostly writes books in the (.+) genre\.",
    ),
    (
        r"What did the parents of (.+) do for a living\?",
        r"The father of {s} was a (.+) and the mother was a (.+)\.",
        r"{s} grew up with a (.+) as a father and a (.+) as a mother\.",
    ),
    (
        r"Can you name a book written by (.+)\?",
        r"{s} wrote the novel (.+)\.",
        r"One of the books by {s} is (.+)\.",
    ),
    (r"Which award did (.+) win\?", r"{s} won the (.+)\.", r"{s} was honoured with the (.+)\."),
    (r"What is the capital of (.+)\?", r"The capital of {s} is (.+)\.", r"(.+) is the capital city of {s}\."),
    (
        r"Which river flows through (.+)\?",
        r"The river (.+) flows through {s}\.",
        r"{s} is crossed by the river (.+)\.",
    ),
    (
        r"What currency is used in (.+)\?",
        r"People in {s} pay with the (.+)\.",
        r"The currency of {s} is the (.+)\.",
    ),
)


def parse_facts(row):
    """(kind, subject, fact in the answer, fact in the paraphrase, facts in the perturbed answers)."""
    for kind, (question, answer, paraphrase) in enumerate(FACT_TEMPLATES):
        asked = re.fullmatch(question, row["question"])
        if asked:
            subject = re.escape(asked.group(1))
            facts = [
                re.fullmatch(pattern.format(s=subject), text).groups()
                for pattern, text in [(answer, row["answer"]), (paraphrase, row["paraphrased_answer"])]
                + [(paraphrase, wrong) for wrong in row["perturbed_answer"]]
            ]
            return kind, asked.group(1), facts[0], facts[1], facts[2:]
    raise AssertionError(f"unknown question {row['question']!r}")


def words(facts):
    return {word.lower() for fact in facts for part in fact for word in re.findall(r"[A-Za-z']+", part)}


@pytest.mark.parametrize("num_authors, seed", [(100, 0), (100, 1), (100, 2), (20, 0), (900, 3)])
def test_benchmark_facts_are_unambiguous(num_authors, seed):
    """Every author has their own name and their own book, so forgetting one author's book never
    forgets a retained author's answer; answer and paraphrase state the same fact and every perturbed
    answer a different one; the general split's facts share no word with any author fact."""
    rows = generate_rows(num_authors=num_authors, seed=seed)
    parsed = [(row, parse_facts(row)) for row in rows["full"] + rows["general"]]
    books = {}
    author_facts, general_facts = [], []
    for row, (kind, subject, fact, paraphrased, wrong) in parsed:
        assert paraphrased == fact, row
        assert len(wrong) == 3 and len(set(wrong)) == 3 and fact not in wrong, row
        if row["author"]:
            assert subject == row["author"] and kind < 5, row
            author_facts += [fact, (subject,)]
            if kind == 3:
                books[subject] = fact[0]
        else:
            assert kind >= 5, row
            general_facts += [fact, (subject,)]
    kinds = {(row["author"], parse_facts(row)[0]) for row in rows["full"]}
    assert len({author for author, _ in kinds}) == num_authors and len(kinds) == 5 * num_authors
    assert len(books) == num_authors and len(set(books.values())) == num_authors  # one title per author
    for forget, retain in RETAIN_OF.items():
        forget_books = {books[r["author"]] for r in rows[forget]}
        assert not any(book in row["answer"] for row in rows[retain] for book in forget_books)
    questions = [row["question"] for row in rows["full"] + rows["general"]]
    assert len(set(questions)) == len(questions)
    assert not words(general_facts) & words(author_facts)


def test_benchmark_bytes_are_pinned(tmp_path):
    """The default benchmark's exact bytes: the README's demo numbers were measured on this data, so a
    change to the generator (or to how random.Random draws) must show up here and be re-measured."""
    paths = write_benchmark(tmp_path)
    joined = hashlib.sha256(b"".join(pathlib.Path(paths[name]).read_bytes() for name in SPLITS)).hexdigest()
    assert joined == "ee1be435d0a2dd262158492a7032a1dc7f8d8281de6d273ee22854bfb3d2d2a0"
    assert generate_rows() == generate_rows()


def test_benchmark_api_and_errors():
    bench = generate_benchmark(num_authors=20)
    assert isinstance(bench, datasets.DatasetDict) and list(bench) == list(SPLITS)
    assert bench["full"].num_rows == 100 and bench["forget01"].num_rows == 5
    assert benchmark_split("forget05", num_authors=20).to_list() == bench["forget05"].to_list()
    assert generate_rows(num_authors=10)["forget01"] == generate_rows(num_authors=10)["forget10"]
    with pytest.raises(ValueError, match="name: unknown split 'forget20'"):
        benchmark_split("forget20")
    with pytest.raises(ValueError, match="num_authors"):
        generate_benchmark(num_authors=5)
    with pytest.raises(ValueError, match="num_authors"):
        generate_rows(num_authors=10**6)
    with pytest.raises(ValueError, match="seed"):
        generate_rows(seed="0")


# -------------------------------------------------------------------------------------- file loading


@pytest.fixture
def qa_rows():
    return generate_rows(num_authors=10)["forget10"][:4]


def write_rows(tmp_path, rows, fmt):
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / f"data.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif fmt == "csv":
        ds.map(lambda r: {"perturbed_answer": json.dumps(r["perturbed_answer"])}).to_csv(str(path))
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet", "saved"])
def test_every_file_format_loads(tmp_path, qa_rows, fmt):
    loaded = load_dataset_file(write_rows(tmp_path, qa_rows, fmt), role="forget")
    assert loaded.num_rows == 4
    for row, original in zip(loaded, qa_rows, strict=True):
        for column in ("question", "answer", "paraphrased_answer", "perturbed_answer"):
            assert row[column] == original[column]


def test_json_variants(tmp_path, qa_rows):
    tofu_style = tmp_path / "tofu.json"  # TOFU ships JSON lines under a .json name
    tofu_style.write_text("\n".join(json.dumps(r) for r in qa_rows))
    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps({"question": ["q1?", "q2?"], "answer": ["a1", "a2"]}))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": qa_rows}))
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "caf\u00e9"}).encode())
    assert load_dataset_file(tofu_style).num_rows == 4
    assert load_dataset_file(columns)[1] == {"question": "q2?", "answer": "a2"}
    assert load_dataset_file(wrapped)["question"] == [r["question"] for r in qa_rows]
    assert load_dataset_file(bom)[0]["text"] == "caf\u00e9"


def test_text_schema(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "a passage to forget"}\n\n{"text": "another one"}\n')
    assert load_dataset_file(path, role="forget").num_rows == 2
    assert load_dataset_file(path, schema="text").num_rows == 2
    with pytest.raises(ValueError, match=r"forget data \(.*corpus.jsonl\).*missing required column\(s\) \["):
        load_dataset_file(path, schema="qa", role="forget")
    both = tmp_path / "both.jsonl"
    both.write_text('{"text": "t", "question": "q?", "answer": "a"}\n')
    assert validate_dataset(load_dataset_file(both)) == "qa"
    assert validate_dataset(load_dataset_file(both, schema="text"), schema="text") == "text"


def error_cases(tmp_path):
    """(file name, content, schema, expected message) for every kind of bad input."""
    qa = '{"question": "q?", "answer": "a"'
    return [
        ("missing.jsonl", None, "auto", FileNotFoundError, r"forget data: .*missing.jsonl does not exist"),
        (
            "cols.jsonl",
            '{"prompt": "x", "completion": "y"}\n',
            "auto",
            ValueError,
            r"'question' and 'answer'",
        ),
        (
            "noanswer.jsonl",
            '{"question": "q?"}\n',
            "qa",
            ValueError,
            r"missing required column\(s\) \['answer'\]",
        ),
        ("notext.jsonl", qa + "}\n", "text", ValueError, r"missing required column\(s\) \['text'\]"),
        (
            "empty_answer.jsonl",
            '{"question": "q?", "answer": "  "}\n',
            "auto",
            ValueError,
            r"row 0: 'answer'",
        ),
        ("number.jsonl", qa + '}\n{"question": "q2?", "answer": 3}\n', "auto", ValueError, "could not read"),
        (
            "null.jsonl",
            qa + '}\n{"question": "q2?", "answer": null}\n',
            "auto",
            ValueError,
            r"row 1: 'answer'",
        ),
        (
            "para.jsonl",
            qa + ', "paraphrased_answer": ""}\n',
            "auto",
            ValueError,
            r"row 0: 'paraphrased_answer'",
        ),
        (
            "pert.jsonl",
            qa + ', "perturbed_answer": "x"}\n',
            "auto",
            ValueError,
            r"'perturbed_answer' must be",
        ),
        ("pert0.jsonl", qa + ', "perturbed_answer": []}\n', "auto", ValueError, "non-empty list"),
        ("empty.jsonl", "", "auto", ValueError, r"^forget set is empty \("),
        ("blank.jsonl", "\n\n", "auto", ValueError, r"^forget set is empty"),
        ("empty.json", "[]", "auto", ValueError, r"^forget set is empty"),
        ("emptycols.json", '{"question": [], "answer": []}', "auto", ValueError, r"^forget set is empty"),
        ("header.csv", "question,answer\n", "auto", ValueError, r"^forget set is empty"),
        ("nothing.csv", "", "auto", ValueError, r"^forget set is empty"),
        ("data.txt", "hello", "auto", ValueError, "unsupported extension '.txt'"),
        ("broken.json", "{not json", "auto", ValueError, r"could not read .*broken.json: line 1"),
        ("broken.jsonl", qa + "}\n{oops\n", "auto", ValueError, r"broken.jsonl: line 2"),
        ("scalar.json", "42", "auto", ValueError, "expected a list of records"),
        ("ragged.json", '{"question": ["a"], "answer": []}', "auto", ValueError, "different lengths"),
        ("odd.json", '{"question": "q", "answer": 1}', "auto", ValueError, "expected a list of records"),
        ("records.json", '[{"question": "q?", "answer": "a"}, 3]', "auto", ValueError, "record 1 is a int"),
        (
            "list.csv",
            "question,answer,perturbed_answer\nq?,a,not a list\n",
            "auto",
            ValueError,
            "list of strings",
        ),
        ("bad.parquet", "not parquet", "auto", ValueError, "could not read"),
        ("bad_schema.jsonl", qa + "}\n", "qa-ish", ValueError, r"schema: expected one of"),
    ]


def test_schema_and_file_errors(tmp_path):
    for name, content, schema, error, message in error_cases(tmp_path):
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        with pytest.raises(error, match=message):
            load_dataset_file(path, schema=schema, role="forget")


def test_empty_and_odd_datasets(tmp_path):
    empty = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"question": [], "answer": []}).to_parquet(str(empty))
    with pytest.raises(ValueError, match=r"^retain set is empty \(.*empty.parquet\)"):
        load_dataset_file(empty, role="retain")
    saved_empty = tmp_path / "saved_empty"
    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(saved_empty))
    with pytest.raises(ValueError, match="^forget set is empty"):
        load_dataset_file(saved_empty, role="forget")
    with pytest.raises(ValueError, match="^forget set is empty"):
        validate_dataset([], role="forget")
    splits = tmp_path / "splits"
    datasets.DatasetDict(
        {"a": datasets.Dataset.from_dict({"text": ["x"]}), "b": datasets.Dataset.from_dict({"text": ["y"]})}
    ).save_to_disk(str(splits))
    with pytest.raises(ValueError, match=r"holds the splits \['a', 'b'\]"):
        load_dataset_file(splits)
    one = tmp_path / "one"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(one))
    assert load_dataset_file(one)["text"] == ["x"]
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    with pytest.raises(ValueError, match="not one written by datasets' save_to_disk"):
        load_dataset_file(plain_dir, role="forget")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="not UTF-8"):
        load_dataset_file(latin)
    with pytest.raises(TypeError, match="expected a datasets.Dataset"):
        validate_dataset("question,answer")


# ------------------------------------------------------------------------------------------ batching


def test_answer_only_labels_and_padding(qa_rows):
    tok = tiny_tokenizer()
    encoded = encode_qa(tok, qa_rows[0]["question"], qa_rows[0]["answer"])
    labels = encoded["labels"]
    first_answer = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in labels[:first_answer])
    assert labels[first_answer:] == encoded["input_ids"][first_answer:]
    prompt_text = tok.decode(encoded["input_ids"][:first_answer], skip_special_tokens=True)
    answer_text = tok.decode(labels[first_answer:], skip_special_tokens=True)
    assert prompt_text.strip().endswith("Answer:") and answer_text.strip() == qa_rows[0]["answer"]
    assert labels[-1] == tok.eos_token_id and encoded["input_ids"][0] == tok.bos_token_id
    batch = next(iter(make_dataloader(qa_rows, tok, batch_size=3)))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "example_index"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["example_index"].tolist() == [0, 1, 2]
    pads = batch["attention_mask"] == 0
    assert bool(pads.any()) and bool((batch["labels"][pads] == IGNORE_INDEX).all())
    assert bool((batch["input_ids"][pads] == tok.pad_token_id).all())
    for row, original in enumerate(qa_rows[:3]):
        target = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert tok.decode(target, skip_special_tokens=True).strip() == original["answer"]


def test_dataloader_from_a_dataset_shuffles_by_seed():
    tok = tiny_tokenizer()
    data = benchmark_split("forget10", num_authors=20)
    order = lambda **kw: [  # noqa: E731
        i
        for b in make_dataloader(data, tok, batch_size=4, shuffle=True, **kw)
        for i in b["example_index"].tolist()
    ]
    assert order(seed=3) == order(seed=3) and sorted(order(seed=3)) == list(range(10))
    assert order(seed=3) != order(seed=4)
    unshuffled = [i for b in make_dataloader(data, tok, batch_size=4) for i in b["example_index"].tolist()]
    assert unshuffled == list(range(10))


def test_answer_column_and_truncation(qa_rows):
    tok = tiny_tokenizer()
    refusal = [dict(r, refusal="I don't know.") for r in qa_rows]
    batch = next(iter(make_dataloader(refusal, tok, batch_size=4, answer_column="refusal")))
    for row in range(4):
        target = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert tok.decode(target, skip_special_tokens=True).strip() == "I don't know."
    with pytest.raises(ValueError, match="answer_column: 'refusal' is not a column"):
        make_dataloader(qa_rows, tok, batch_size=2, answer_column="refusal")
    with pytest.raises(ValueError, match="answer_column: row 1"):
        make_dataloader(
            [refusal[0], dict(refusal[1], refusal="")], tok, batch_size=2, answer_column="refusal"
        )
    with pytest.raises(ValueError, match="plain text"):
        make_dataloader([{"text": "x"}], tok, batch_size=1, answer_column="refusal")
    prompt_length = encode_qa(tok, qa_rows[0]["question"], "x")["labels"].count(IGNORE_INDEX)
    short = encode_dataset(qa_rows[:1], tok, max_length=prompt_length + 3)[0]
    assert len(short["input_ids"]) == prompt_length + 3
    assert sum(label != IGNORE_INDEX for label in short["labels"]) == 3
    with pytest.raises(ValueError, match="max_length"):
        encode_dataset(qa_rows[:1], tok, max_length=prompt_length)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"batch_size": 2, "max_length": 1}, "max_length"),
        ({"batch_size": 2, "seed": None}, "seed"),
    ],
)
def test_dataloader_rejects_bad_options(qa_rows, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_dataloader(qa_rows, tiny_tokenizer(), **kwargs)


def test_text_batches_train_on_every_token():
    tok = tiny_tokenizer()
    batch = next(iter(make_dataloader([{"text": "Where was it born?"}, {"text": "Hi"}], tok, batch_size=2)))
    real = batch["attention_mask"] == 1
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])
    assert bool((batch["labels"][~real] == IGNORE_INDEX).all())
    assert tok.decode(batch["input_ids"][0], skip_special_tokens=True) == "Where was it born?"
