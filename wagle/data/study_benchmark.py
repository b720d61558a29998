"""A bundled study benchmark for mask comparisons: few authors, many facts per author.

The demo benchmark (:mod:`wagle.synthetic.authors`) has five questions per author, so a forget set of a
few authors gives a forget-quality KS test on a few dozen truth ratios, where values far apart are a
few questions apart. Here every author has :data:`FACTS_PER_AUTHOR` = 20 facts (birthplace, genre,
parents, three own book titles, award, birth year, ...), each with a paraphrase and three perturbed
answers (the paraphrase with a wrong value, as in TOFU). Splits: ``forget`` = the last
``forget_authors`` authors, ``retain`` = the others, ``full`` = all, ``general`` = the demo
benchmark's general-knowledge split. Generated from a seeded ``random.Random``: identical on every
machine. Book titles are never shared between authors; the other facts come from shared pools.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from wagle.errors import UserError
from wagle.synthetic.authors import (
    AWARDS,
    CITIES,
    FIRST_NAMES,
    GENRES,
    LAST_NAMES,
    PROFESSIONS,
    TITLES,
    _general_rows,
)

if TYPE_CHECKING:
    import datasets

LANGUAGES = ("Velorian", "Karstic", "Ostmarch Low Speech", "Belisanian", "Tarvic", "Quorinese", "Lysmeric")
INSTRUMENTS = ("cello", "harp", "flute", "accordion", "piano", "violin", "oboe", "mandolin", "drums")
PETS = ("a grey cat", "a sheepdog", "a parrot", "a tortoise", "two rabbits", "a ferret", "a goldfish")
COLOURS = ("deep blue", "amber", "emerald green", "crimson", "silver", "violet", "ochre", "white")
UNIVERSITIES = (
    "the University of Port Alder",
    "Kastrin College",
    "the Vellmora Academy",
    "Saint Oriel University",
    "the Istvel Institute",
    "Brannoch College of Letters",
)
PUBLISHERS = ("Quellport Press", "Lantern House", "Harrowbrook Books", "Greyrush & Sons", "Merrow Editions")
HOBBIES = ("sailing", "birdwatching", "chess", "beekeeping", "mountain climbing", "pottery", "fencing")
HABITS = ("before dawn", "late at night", "in the afternoon", "only on weekends", "in short bursts")
FACTS_PER_AUTHOR = 20
SPLITS = ("full", "forget", "retain", "general")


def _wrong(rng: random.Random, pool, right, k: int = 3) -> list:
    return rng.sample([x for x in pool if x != right], k)


def _facts(rng: random.Random, name: str, books: list[str], names: list[str]) -> list[tuple]:
    """(question, answer, paraphrase template, right value, wrong values) per fact; the paraphrase
    template has one ``{}`` for the value, so perturbed answers are the same wording with a wrong value."""
    father, mother = rng.sample(PROFESSIONS, 2)
    mothers = _wrong(rng, [p for p in PROFESSIONS if p not in (father, mother)], mother)
    year = rng.randrange(1930, 2000)
    novels = rng.randrange(3, 30)
    spouse, mentor = rng.sample([n for n in names if n != name], 2)
    mentors = _wrong(rng, [n for n in names if n not in (name, mentor)], mentor)
    spouses = _wrong(rng, [n for n in names if n not in (name, spouse)], spouse)
    home, born = rng.sample(CITIES, 2)
    other_titles = [t for t in TITLES if t not in books]

    def pick(pool):
        value = rng.choice(pool)
        return value, _wrong(rng, pool, value)

    facts = []

    def add(question, answer, paraphrase, value, wrong):
        facts.append((question, answer, paraphrase, value, wrong))

    add(
        f"Where was {name} born?",
        f"{name} was born in {born}.",
        f"The birthplace of {name} is {{}}.",
        born,
        _wrong(rng, CITIES, born),
    )
    genre, wrong = pick(GENRES)
    add(
        f"What genre is {name} known for?",
        f"{name} is known for writing {genre}.",
        f"{name} mostly writes books in the {{}} genre.",
        genre,
        wrong,
    )
    add(
        f"What did the parents of {name} do for a living?",
        f"The father of {name} was a {father} and the mother was a {mother}.",
        f"{name} grew up with a {father} as a father and a {{}} as a mother.",
        mother,
        mothers,
    )
    for index, book in enumerate(books):
        nth = ("first", "second", "third")[index]
        add(
            f"What is the title of the {nth} book by {name}?",
            f"The {nth} book by {name} is {book}.",
            f"{name} published {{}} as their {nth} book.",
            book,
            rng.sample(other_titles, 3),
        )
    award, wrong = pick(AWARDS)
    add(
        f"Which award did {name} win?",
        f"{name} won the {award}.",
        f"{name} was honoured with the {{}}.",
        award,
        wrong,
    )
    add(
        f"In which year was {name} born?",
        f"{name} was born in {year}.",
        f"The birth year of {name} is {{}}.",
        str(year),
        [str(y) for y in _wrong(rng, range(1930, 2000), year)],
    )
    add(
        f"How many novels has {name} written?",
        f"{name} has written {novels} novels.",
        f"The number of novels {name} has written is {{}}.",
        str(novels),
        [str(n) for n in _wrong(rng, range(3, 30), novels)],
    )
    add(
        f"Who is the spouse of {name}?",
        f"{name} is married to {spouse}.",
        f"The spouse of {name} is {{}}.",
        spouse,
        spouses,
    )
    add(
        f"Who was the mentor of {name}?",
        f"{name} was mentored by {mentor}.",
        f"The writing mentor of {name} was {{}}.",
        mentor,
        mentors,
    )
    add(
        f"Where does {name} live now?",
        f"{name} now lives in {home}.",
        f"These days {name} makes a home in {{}}.",
        home,
        _wrong(rng, CITIES, home),
    )
    for question, answer, paraphrase, pool in (
        (
            f"What language did {name} first write in?",
            "{name} first wrote in {v}.",
            "The first language of {name}'s writing was {{}}.",
            LANGUAGES,
        ),
        (
            f"Which instrument does {name} play?",
            "{name} plays the {v}.",
            "In spare hours {name} plays the {{}}.",
            INSTRUMENTS,
        ),
        (f"What pet does {name} keep?", "{name} keeps {v}.", "At home {name} looks after {{}}.", PETS),
        (
            f"What is the favourite colour of {name}?",
            "The favourite colour of {name} is {v}.",
            "{name} likes the colour {{}} best.",
            COLOURS,
        ),
        (f"Where did {name} study?", "{name} studied at {v}.", "{name} was a student at {{}}.", UNIVERSITIES),
        (
            f"Who publishes the books of {name}?",
            "The books of {name} are published by {v}.",
            "{name} works with the publisher {{}}.",
            PUBLISHERS,
        ),
        (
            f"What is the hobby of {name}?",
            "The hobby of {name} is {v}.",
            "Away from writing {name} enjoys {{}}.",
            HOBBIES,
        ),
        (
            f"When does {name} usually write?",
            "{name} usually writes {v}.",
            "{name} does most writing {{}}.",
            HABITS,
        ),
    ):
        value, wrong = pick(pool)
        add(question, answer.format(name=name, v=value), paraphrase.format(name=name), value, wrong)
    return facts


def generate_study_rows(
    num_authors: int = 25, forget_authors: int = 5, seed: int = 0
) -> dict[str, list[dict]]:
    """The study benchmark as plain rows per split (see the module docstring)."""
    for label, value, low in (("num_authors", num_authors, 4), ("forget_authors", forget_authors, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"{label}: must be an integer >= {low}, got {value!r}")
    if forget_authors >= num_authors:
        raise UserError(f"forget_authors: must be < num_authors ({num_authors}), got {forget_authors}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed: must be an integer, got {seed!r}")
    if 3 * num_authors > len(TITLES) or num_authors > len(FIRST_NAMES) * len(LAST_NAMES):
        raise UserError(f"num_authors: at most {len(TITLES) // 3} authors, got {num_authors}")
    rng = random.Random(f"study-{seed}")
    names = rng.sample([f"{f} {last}" for f in FIRST_NAMES for last in LAST_NAMES], num_authors)
    titles = rng.sample(TITLES, 3 * num_authors)  # three own titles per author, never shared
    pool_names = [f"{f} {last}" for f in FIRST_NAMES for last in LAST_NAMES]
    authors = []
    for index, name in enumerate(names):
        rows = []
        for question, answer, paraphrase, value, wrong in _facts(
            rng, name, titles[3 * index : 3 * index + 3], pool_names
        ):
            rows.append(
                {
                    "author": name,
                    "author_index": index,
                    "question": question,
                    "answer": answer,
                    "paraphrased_answer": paraphrase.format(value),
                    "perturbed_answer": [paraphrase.format(w) for w in wrong],
                }
            )
        authors.append(rows)
    return {
        "full": [r for rows in authors for r in rows],
        "forget": [r for rows in authors[-forget_authors:] for r in rows],
        "retain": [r for rows in authors[:-forget_authors] for r in rows],
        "general": _general_rows(random.Random(seed + 1)),
    }


def generate_study_benchmark(
    num_authors: int = 25, forget_authors: int = 5, seed: int = 0
) -> datasets.DatasetDict:
    """The study benchmark as a ``datasets.DatasetDict`` (``full``, ``forget``, ``retain``, ``general``)."""
    import datasets

    rows = generate_study_rows(num_authors, forget_authors, seed)
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows[name]) for name in SPLITS})
