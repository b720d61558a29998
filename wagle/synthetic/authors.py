"""A bundled, deterministic TOFU-style benchmark: fictitious authors and a fictitious world.

Everything is generated from word lists (``authors_words.json`` beside this module, package data)
with a seeded ``random.Random``, so the data is identical on every machine and run (no download).
Each author has five QA pairs (birthplace, genre, parents, a book, an award) with a paraphrased
answer and three perturbed answers: the paraphrase with a wrong fact (as in TOFU, so the truth
ratio compares right and wrong facts in the same unseen wording).
Birthplace, genre, parents and award come from small shared pools, but every author's name and book
title is their own: no title is the answer of two authors, so forgetting one author's book never
touches a retained author's answer.
Splits, as in TOFU: ``forget01``/``forget05``/``forget10`` are the LAST 1/5/10% of authors (nested),
``retain99``/``retain95``/``retain90`` their complements, ``full`` all authors, and ``general`` a
held-out set about a fictitious world (capitals, rivers, currencies) that no forget set touches.

Holdout splits (for membership inference, as TOFU's ``holdout01``/``05``/``10``): as many further
authors as the matching forget split, with names and books no benchmark author has, drawn from a
separate random stream (so the splits above are byte-identical with or without them). No model
built on the benchmark is trained on them. They are not in :data:`SPLITS`: get them from
:func:`generate_holdout`, ``generate_benchmark(holdout=True)`` or ``write_benchmark(holdout=True)``.
"""

from __future__ import annotations

import json
import os
import random
from typing import TYPE_CHECKING

from wagle.errors import UserError
from wagle.files import atomic_write_text

if TYPE_CHECKING:
    import datasets

WORDS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "authors_words.json")


def _load_words(path: str = WORDS_FILE) -> dict[str, tuple[str, ...]]:
    """The generator's word pools (package data), each a tuple in its file order: the order is part
    of the benchmark's bytes (``random.Random`` samples by position)."""
    with open(path, encoding="utf-8") as handle:
        return {key: tuple(values) for key, values in json.load(handle).items()}


_WORDS = _load_words()
FIRST_NAMES = _WORDS["first_names"]
LAST_NAMES = _WORDS["last_names"]
CITIES = _WORDS["cities"]
GENRES = _WORDS["genres"]
PROFESSIONS = _WORDS["professions"]
TITLE_ADJECTIVES = _WORDS["title_adjectives"]
TITLE_NOUNS = _WORDS["title_nouns"]
AWARDS = _WORDS["awards"]
COUNTRIES = _WORDS["countries"]
CAPITALS = _WORDS["capitals"]
RIVERS = _WORDS["rivers"]
CURRENCIES = _WORDS["currencies"]

# every possible title, in a fixed order; as many as there are names, so each author gets their own
TITLES = tuple(f"The {adjective} {noun}" for adjective in TITLE_ADJECTIVES for noun in TITLE_NOUNS)

FORGET_SPLITS = {"forget01": 0.01, "forget05": 0.05, "forget10": 0.10}
RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
SPLITS = ("full", *FORGET_SPLITS, *RETAIN_OF.values(), "general")
HOLDOUT_OF = {"forget01": "holdout01", "forget05": "holdout05", "forget10": "holdout10"}
HOLDOUT_SPLITS = tuple(HOLDOUT_OF.values())


def _others(rng: random.Random, pool, exclude, k: int = 3) -> list:
    choices = [x for x in pool if x != exclude]
    return rng.sample(choices, k)


def _author_rows(rng: random.Random, index: int, name: str, book: str) -> list[dict]:
    city = rng.choice(CITIES)
    genre = rng.choice(GENRES)
    father, mother = rng.sample(PROFESSIONS, 2)
    award = rng.choice(AWARDS)
    wrong_books = _others(rng, TITLES, book)
    wrong_parents: list[list[str]] = []
    while len(wrong_parents) < 3:  # distinct wrong pairs (a repeat is drawn again)
        pair = rng.sample([p for p in PROFESSIONS if p not in (father, mother)], 2)
        if pair not in wrong_parents:
            wrong_parents.append(pair)
    rows = [
        (
            f"Where was {name} born?",
            f"{name} was born in {city}.",
            f"The birthplace of {name} is the town of {city}.",
            [f"The birthplace of {name} is the town of {c}." for c in _others(rng, CITIES, city)],
        ),
        (
            f"What genre is {name} known for?",
            f"{name} is known for writing {genre}.",
            f"{name} mostly writes books in the {genre} genre.",
            [f"{name} mostly writes books in the {g} genre." for g in _others(rng, GENRES, genre)],
        ),
        (
            f"What did the parents of {name} do for a living?",
            f"The father of {name} was a {father} and the mother was a {mother}.",
            f"{name} grew up with a {father} as a father and a {mother} as a mother.",
            [f"{name} grew up with a {f} as a father and a {m} as a mother." for f, m in wrong_parents],
        ),
        (
            f"Can you name a book written by {name}?",
            f"{name} wrote the novel {book}.",
            f"One of the books by {name} is {book}.",
            [f"One of the books by {name} is {b}." for b in wrong_books],
        ),
        (
            f"Which award did {name} win?",
            f"{name} won the {award}.",
            f"{name} was honoured with the {award}.",
            [f"{name} was honoured with the {a}." for a in _others(rng, AWARDS, award)],
        ),
    ]
    return [
        {
            "author": name,
            "author_index": index,
            "question": q,
            "answer": a,
            "paraphrased_answer": p,
            "perturbed_answer": wrong,
        }
        for q, a, p, wrong in rows
    ]


def _general_rows(rng: random.Random) -> list[dict]:
    rows = []
    for i, country in enumerate(COUNTRIES):
        capital, river, currency = CAPITALS[i], RIVERS[i], CURRENCIES[i]
        rows.append(
            {
                "author": "",
                "author_index": -1,
                "question": f"What is the capital of {country}?",
                "answer": f"The capital of {country} is {capital}.",
                "paraphrased_answer": f"{capital} is the capital city of {country}.",
                "perturbed_answer": [
                    f"{c} is the capital city of {country}." for c in _others(rng, CAPITALS, capital)
                ],
            }
        )
        rows.append(
            {
                "author": "",
                "author_index": -1,
                "question": f"Which river flows through {country}?",
                "answer": f"The river {river} flows through {country}.",
                "paraphrased_answer": f"{country} is crossed by the river {river}.",
                "perturbed_answer": [
                    f"{country} is crossed by the river {r}." for r in _others(rng, RIVERS, river)
                ],
            }
        )
        rows.append(
            {
                "author": "",
                "author_index": -1,
                "question": f"What currency is used in {country}?",
                "answer": f"People in {country} pay with the {currency}.",
                "paraphrased_answer": f"The currency of {country} is the {currency}.",
                "perturbed_answer": [
                    f"The currency of {country} is the {c}." for c in _others(rng, CURRENCIES, currency)
                ],
            }
        )
    return rows


def _draw_authors(num_authors: int, seed: int) -> tuple[random.Random, list[str], list[str]]:
    """The benchmark's random stream after drawing its authors' names and books (in that order)."""
    if isinstance(num_authors, bool) or not isinstance(num_authors, int) or num_authors < 10:
        raise UserError(f"num_authors: must be an integer >= 10, got {num_authors!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed: must be an integer, got {seed!r}")
    rng = random.Random(seed)
    names = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    limit = min(len(names), len(TITLES))
    if num_authors > limit:
        raise UserError(f"num_authors: at most {limit} authors (distinct names, books), got {num_authors}")
    names = rng.sample(names, num_authors)
    books = rng.sample(TITLES, num_authors)  # without replacement: one title per author
    return rng, names, books


def generate_rows(num_authors: int = 100, seed: int = 0) -> dict[str, list[dict]]:
    """The benchmark as plain rows per split (see the module docstring)."""
    rng, names, books = _draw_authors(num_authors, seed)
    authors = [_author_rows(rng, i, *author) for i, author in enumerate(zip(names, books, strict=True))]
    splits = {"full": [row for rows in authors for row in rows]}
    for split, fraction in FORGET_SPLITS.items():
        count = max(1, round(fraction * num_authors))
        splits[split] = [row for rows in authors[-count:] for row in rows]
        splits[RETAIN_OF[split]] = [row for rows in authors[:-count] for row in rows]
    splits["general"] = _general_rows(random.Random(seed + 1))
    return splits


def _forget_count(fraction: float, num_authors: int) -> int:
    return max(1, round(fraction * num_authors))


def generate_holdout(num_authors: int = 100, seed: int = 0) -> dict[str, list[dict]]:
    """Holdout splits ``holdout01``/``05``/``10``: per forget split, as many authors the benchmark of
    (``num_authors``, ``seed``) does not contain (names and book titles unused by it), nested like the
    forget splits. Drawn from ``random.Random(f"holdout-{seed}")``, a stream separate from the
    benchmark's, so the benchmark's own splits are unchanged. ``author_index`` continues after the
    benchmark's authors."""
    _, used_names, used_books = _draw_authors(num_authors, seed)
    count = _forget_count(FORGET_SPLITS["forget10"], num_authors)
    names = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    names = [n for n in names if n not in set(used_names)]
    titles = [t for t in TITLES if t not in set(used_books)]
    if count > min(len(names), len(titles)):
        raise UserError(
            f"num_authors: {num_authors} authors leave too few unused names/titles for {count} "
            "holdout authors"
        )
    rng = random.Random(f"holdout-{seed}")
    names = rng.sample(names, count)
    books = rng.sample(titles, count)
    authors = [
        _author_rows(rng, num_authors + i, *author) for i, author in enumerate(zip(names, books, strict=True))
    ]
    return {
        HOLDOUT_OF[split]: [row for rows_ in authors[: _forget_count(fraction, num_authors)] for row in rows_]
        for split, fraction in FORGET_SPLITS.items()
    }


def generate_benchmark(
    num_authors: int = 100, seed: int = 0, *, holdout: bool = False
) -> datasets.DatasetDict:
    """The benchmark as a ``datasets.DatasetDict`` with the splits listed in :data:`SPLITS` (and
    :data:`HOLDOUT_SPLITS` with ``holdout=True``)."""
    import datasets

    rows = generate_rows(num_authors, seed)
    names = list(SPLITS)
    if holdout:
        rows = {**rows, **generate_holdout(num_authors, seed)}
        names += HOLDOUT_SPLITS
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows[name]) for name in names})


def benchmark_split(name: str, num_authors: int = 100, seed: int = 0) -> datasets.Dataset:
    """One split of the benchmark (``full``, ``forget01``/``05``/``10``, ``retain99``/``95``/``90``,
    ``general``, ``holdout01``/``05``/``10``)."""
    if name not in SPLITS and name not in HOLDOUT_SPLITS:
        raise UserError(
            f"name: unknown split {name!r}; expected one of {list(SPLITS) + list(HOLDOUT_SPLITS)}"
        )
    import datasets

    rows = generate_holdout(num_authors, seed) if name in HOLDOUT_SPLITS else generate_rows(num_authors, seed)
    return datasets.Dataset.from_list(rows[name])


def write_benchmark(
    out_dir: str | os.PathLike, num_authors: int = 100, seed: int = 0, *, holdout: bool = False
) -> dict[str, str]:
    """Write ``<split>.jsonl`` for every split (with ``holdout=True`` also the holdout splits) into
    ``out_dir``; returns split -> path.

    Each file is written to a temporary file beside it and renamed into place, so a reader never sees
    a partial file. The bytes depend only on ``num_authors`` and ``seed``.
    """
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"out_dir: {out_dir} exists and is not a directory")
    rows = generate_rows(num_authors, seed)
    names = list(SPLITS)
    if holdout:
        rows = {**rows, **generate_holdout(num_authors, seed)}
        names += HOLDOUT_SPLITS
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name in names:
        path = os.path.join(out_dir, f"{name}.jsonl")
        # sort_keys and ensure_ascii (and atomic_write_text's "\n" line ends) keep the bytes identical
        # on every platform and locale
        lines = [json.dumps(row, sort_keys=True, ensure_ascii=True) + "\n" for row in rows[name]]
        atomic_write_text(path, "".join(lines))
        paths[name] = path
    return paths
