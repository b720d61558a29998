"""Multiple-choice data (WMDP / MMLU style): the file format and its validation.

File format (``.json``/``.jsonl``/``.parquet``/``.csv`` or a saved dataset, loaded with
``load_dataset_file(path, schema="multiple_choice")``; ``schema="auto"`` detects it), one row per
question, the columns of the WMDP and MMLU releases:

* ``question``: non-empty string;
* ``choices``: a list of at least two non-empty strings (in CSV, a JSON list such as ``["a", "b"]``);
* ``answer``: the index of the correct choice, 0-based: an integer, a digit string (CSV), or a
  letter ``"A"``, ``"B"``, ... .

Other columns (e.g. MMLU's ``subject``) are kept and ignored. Files are read locally; nothing is
downloaded.

A bundled synthetic set in this format: :func:`wagle.synthetic.hazard_multiple_choice`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from wagle.errors import UserError

MC_COLUMNS = ("question", "choices", "answer")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def answer_index(value: Any, num_choices: int) -> int | None:
    """The 0-based index an ``answer`` cell names (int, digit string or letter), None if invalid."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        index = value
    elif isinstance(value, str) and value.strip().isdigit():
        index = int(value.strip())
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        index = LETTERS.index(value.strip().upper())
    else:
        return None
    return index if 0 <= index < num_choices else None


def validate_multiple_choice(rows: Sequence[dict], *, role: str = "data", where: str = "") -> None:
    """Check the ``question``/``choices``/``answer`` columns of every row; errors name the row."""
    for row_number, row in enumerate(rows):
        missing = [c for c in MC_COLUMNS if c not in row]
        if missing:
            raise UserError(f"{role} data{where}: row {row_number}: missing column(s) {missing}")
        question, choices = row["question"], row["choices"]
        if not isinstance(question, str) or not question.strip():
            raise UserError(
                f"{role} data{where}: row {row_number}: 'question' must be a non-empty string, "
                f"got {question!r:.80}"
            )
        if (
            not isinstance(choices, (list, tuple))
            or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)
        ):
            raise UserError(
                f"{role} data{where}: row {row_number}: 'choices' must be a list of at least two non-empty "
                f"strings, got {choices!r:.80}"
            )
        if len(choices) > len(LETTERS):
            raise UserError(f"{role} data{where}: row {row_number}: at most {len(LETTERS)} choices")
        if answer_index(row["answer"], len(choices)) is None:
            raise UserError(
                f"{role} data{where}: row {row_number}: 'answer' must be the index of one of its "
                f"{len(choices)} choices (0-based integer or a letter), got {row['answer']!r:.40}"
            )
