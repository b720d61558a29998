"""Loading forget/retain data from local files (JSON, JSONL, CSV, Parquet, saved ``datasets`` dirs).

Files are parsed directly (no ``datasets`` builder, so nothing is written to the Hugging Face cache)
and checked against a schema:

* ``qa``: ``question`` and ``answer`` (non-empty strings); optional ``paraphrased_answer`` (string)
  and ``perturbed_answer`` (a list of strings; in CSV, a JSON-encoded list);
* ``text``: ``text`` (non-empty strings), for corpus-style forgetting;
* ``multiple_choice``: ``question``, ``choices`` (a list of strings) and ``answer`` (the correct
  choice's index), as WMDP and MMLU (see :mod:`wagle.data.multiple_choice`);
* ``auto``: ``multiple_choice`` when there is a ``choices`` column beside ``question`` and
  ``answer``, ``qa`` when ``question`` and ``answer`` are present, else ``text``.

Every error names the file, the role of the set (``forget``, ``retain`` ...) and the column or row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from wagle.errors import UserError, first_line

if TYPE_CHECKING:  # imported where used: `import wagle` stays light (datasets takes ~1 s to import)
    import datasets

QA_COLUMNS = ("question", "answer")
TEXT_COLUMNS = ("text",)
SCHEMAS = ("auto", "qa", "text", "multiple_choice")
EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet")
LIST_COLUMNS = ("perturbed_answer", "choices")
OPTIONAL_TEXT_COLUMNS = ("paraphrased_answer",)


def _from_records(records, *, role: str, path: str) -> datasets.Dataset:
    if not records:
        raise UserError(f"{role} set is empty ({path})")
    for number, record in enumerate(records):
        if not isinstance(record, dict):
            raise UserError(
                f"{role} data: {path}: record {number} is a {type(record).__name__}, expected an object"
            )
    import datasets

    try:
        return datasets.Dataset.from_list(records)
    except Exception as exc:  # pyarrow type errors (a column mixing strings and numbers, ...)
        raise UserError(f"{role} data: could not read {path}: {first_line(exc)}") from None


def _read_json_lines(lines: Iterable[str], *, role: str, path: str) -> list:
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(f"{role} data: could not read {path}: line {number}: {exc.msg}") from None
    return records


def _records_of_dict(obj: dict, *, role: str, path: str) -> list:
    """``{"data": [records]}`` -> records; ``{"column": [values], ...}`` -> records."""
    values = list(obj.values())
    if len(values) == 1 and isinstance(values[0], list) and values[0] and isinstance(values[0][0], dict):
        return values[0]
    if values and all(isinstance(v, list) for v in values):
        lengths = {k: len(v) for k, v in obj.items()}
        if len(set(lengths.values())) != 1:
            raise UserError(f"{role} data: {path}: columns have different lengths {lengths}")
        return [dict(zip(obj, row, strict=True)) for row in zip(*values, strict=True)]
    raise UserError(
        f"{role} data: {path}: expected a list of records, a dict of equal-length columns or "
        f'{{"<name>": [records]}}; got an object with keys {sorted(obj)[:10]}'
    )


def _read_json(path: str, *, role: str, lines: bool) -> datasets.Dataset:
    try:
        with open(path, encoding="utf-8-sig") as handle:  # -sig: tolerate a byte-order mark
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise UserError(f"{role} data: could not read {path}: not UTF-8 text ({exc.reason})") from None
    if not text.strip():
        raise UserError(f"{role} set is empty ({path})")
    if not lines:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":
                raise UserError(f"{role} data: could not read {path}: line {exc.lineno}: {exc.msg}") from None
            lines = True  # a .json file holding JSON lines (as TOFU's files do)
        else:
            if isinstance(obj, dict):
                obj = _records_of_dict(obj, role=role, path=path)
            if not isinstance(obj, list):
                raise UserError(
                    f"{role} data: {path}: expected a list of records, got a JSON {type(obj).__name__}"
                )
            return _from_records(obj, role=role, path=path)
    return _from_records(_read_json_lines(text.splitlines(), role=role, path=path), role=role, path=path)


def _read_csv(path: str, *, role: str) -> datasets.Dataset:
    import datasets
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise UserError(f"{role} set is empty ({path})") from None
    except Exception as exc:
        raise UserError(f"{role} data: could not read {path}: {first_line(exc)}") from None
    if frame.empty:
        raise UserError(f"{role} set is empty ({path})")
    return datasets.Dataset.from_pandas(frame, preserve_index=False)


def _read_parquet(path: str, *, role: str) -> datasets.Dataset:
    import datasets
    import pyarrow.parquet as pq
    from datasets.table import InMemoryTable

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise UserError(f"{role} data: could not read {path}: {first_line(exc)}") from None
    return datasets.Dataset(InMemoryTable(table))


def _saved_without_shards(path: str) -> bool:
    try:
        with open(os.path.join(path, "state.json"), encoding="utf-8") as handle:
            return not json.load(handle).get("_data_files")
    except (OSError, ValueError, AttributeError):
        return False


def _read_saved(path: str, *, role: str) -> datasets.Dataset:
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError:
        raise UserError(
            f"{role} data: {path} is a folder but not one written by datasets' save_to_disk; "
            f"point at a data file ({', '.join(EXTENSIONS)}) or a saved dataset"
        ) from None
    except Exception as exc:  # datasets fails on a saved data set with no rows (no shards)
        if _saved_without_shards(path):
            raise UserError(f"{role} set is empty ({path})") from None
        raise UserError(f"{role} data: could not read {path}: {first_line(exc)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise UserError(
                f"{role} data: {path} holds the splits {sorted(loaded)}; point at one split's folder"
            )
        loaded = next(iter(loaded.values()))
    return loaded


def _read(path: str, role: str) -> datasets.Dataset:
    if os.path.isdir(path):
        return _read_saved(path, role=role)
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".json", ".jsonl"):
        return _read_json(path, role=role, lines=suffix == ".jsonl")
    if suffix == ".csv":
        return _read_csv(path, role=role)
    if suffix == ".parquet":
        return _read_parquet(path, role=role)
    raise UserError(
        f"{role} data: {path} has an unsupported extension {suffix!r}; use one of {list(EXTENSIONS)} "
        "or a folder written by save_to_disk"
    )


def _decode_lists(dataset: datasets.Dataset, column: str, role: str, path: str) -> datasets.Dataset:
    """CSV cannot hold lists: accept a JSON-encoded list of strings in ``column``."""
    if column not in dataset.column_names or dataset.num_rows == 0:
        return dataset
    values = dataset[column]
    if not any(isinstance(v, str) for v in values):
        return dataset
    decoded = []
    for row, value in enumerate(values):
        try:
            parsed = json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
            raise UserError(
                f"{role} data: {path}: row {row}: column {column!r} must be a list of strings "
                f'(in CSV, a JSON list such as ["a", "b"]), got {value!r:.80}'
            )
        decoded.append(parsed)
    return dataset.remove_columns(column).add_column(column, decoded)


def detect_schema(column_names: Iterable[str], *, role: str = "data", path: str = "") -> str:
    """``multiple_choice`` with question+choices+answer columns, else ``qa`` with question+answer,
    ``text`` with a text column."""
    names = set(column_names)
    if {"question", "choices", "answer"} <= names:
        return "multiple_choice"
    if set(QA_COLUMNS) <= names:
        return "qa"
    if set(TEXT_COLUMNS) <= names:
        return "text"
    raise UserError(
        f"{role} data{(': ' + path) if path else ''}: needs columns 'question' and 'answer' (QA) or 'text' "
        f"(plain text); found {sorted(names)}"
    )


def _check_strings(values: Sequence, column: str, where: str, role: str) -> None:
    for row, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise UserError(
                f"{role} data{where}: row {row}: {column!r} must be a non-empty string, got {value!r:.80}"
            )


def validate_dataset(
    dataset: datasets.Dataset | list[dict], *, schema: str = "auto", role: str = "data", path: str = ""
) -> str:
    """Check columns and values of a data set (a ``Dataset`` or a list of dicts); returns the schema
    (``qa`` or ``text``). Raises ``ValueError`` naming the role, the path, the column and the row."""
    import datasets

    if schema not in SCHEMAS:
        raise UserError(f"schema: expected one of {list(SCHEMAS)}, got {schema!r}")
    where = f" ({path})" if path else ""
    if isinstance(dataset, list):
        if not dataset:
            raise UserError(f"{role} set is empty{where}")
        if not all(isinstance(row, dict) for row in dataset):
            raise TypeError(f"{role} data: a list of rows must hold dicts")
        dataset = _from_records(dataset, role=role, path=path or "<list>")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"{role} data: expected a datasets.Dataset or a list of dicts, got {type(dataset).__name__}"
        )
    if dataset.num_rows == 0:
        raise UserError(f"{role} set is empty{where}")
    found = detect_schema(dataset.column_names, role=role, path=path) if schema == "auto" else schema
    if found == "multiple_choice":
        from .multiple_choice import validate_multiple_choice

        validate_multiple_choice(dataset.to_list(), role=role, where=where)
        return found
    required = QA_COLUMNS if found == "qa" else TEXT_COLUMNS
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise UserError(
            f"{role} data{where}: schema {found!r} needs column(s) {list(required)}; missing required "
            f"column(s) {missing}; found {dataset.column_names}"
        )
    for column in required:
        _check_strings(dataset[column], column, where, role)
    if found == "qa":
        for column in OPTIONAL_TEXT_COLUMNS:
            if column in dataset.column_names:
                _check_strings(dataset[column], column, where, role)
        for column in LIST_COLUMNS:
            if column not in dataset.column_names:
                continue
            for row, value in enumerate(dataset[column]):
                if (
                    not isinstance(value, list)
                    or not value
                    or not all(isinstance(x, str) and x.strip() for x in value)
                ):
                    raise UserError(
                        f"{role} data{where}: row {row}: {column!r} must be a non-empty list of non-empty "
                        f"strings, got {value!r:.80}"
                    )
    return found


def load_dataset_file(
    path: str | os.PathLike, *, schema: str = "auto", role: str = "data"
) -> datasets.Dataset:
    """Load and validate a local data set (``.json``/``.jsonl``/``.csv``/``.parquet`` or a saved dir).

    ``schema``: ``qa`` (``question``, ``answer``; optional ``paraphrased_answer`` and a
    ``perturbed_answer`` list), ``text`` (``text``), or ``auto``. ``role`` names the set in errors
    (e.g. ``"forget"`` -> "forget set is empty (...)"). A ``.json`` file may hold a list of records,
    a dict of equal-length columns, ``{"<name>": [records]}``, or JSON lines.
    """
    if schema not in SCHEMAS:
        raise UserError(f"schema: expected one of {list(SCHEMAS)}, got {schema!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{role} data: {path} does not exist")
    dataset = _read(path, role)
    for column in LIST_COLUMNS:
        dataset = _decode_lists(dataset, column, role, path)
    validate_dataset(dataset, schema=schema, role=role, path=path)
    return dataset
