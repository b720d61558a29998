"""Loading forget/retain data from local files (JSON, JSONL, CSV, Parquet, saved ``datasets`` dirs)."""

from __future__ import annotations

import json
import os

import datasets

QA_COLUMNS = ("question", "answer")
TEXT_COLUMNS = ("text",)
SCHEMAS = ("auto", "qa", "text")
_READERS = {
    ".json": datasets.Dataset.from_json,
    ".jsonl": datasets.Dataset.from_json,
    ".csv": datasets.Dataset.from_csv,
    ".parquet": datasets.Dataset.from_parquet,
}


def _read(path: str, role: str) -> datasets.Dataset:
    if os.path.isdir(path):
        try:
            loaded = datasets.load_from_disk(path)
        except FileNotFoundError as exc:
            raise ValueError(
                f"{role} data: {path} is a folder but not a saved datasets folder ({exc})"
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            if len(loaded) != 1:
                raise ValueError(f"{role} data: {path} holds splits {sorted(loaded)}; point at one split")
            loaded = next(iter(loaded.values()))
        return loaded
    suffix = os.path.splitext(path)[1].lower()
    reader = _READERS.get(suffix)
    if reader is None:
        raise ValueError(
            f"{role} data: {path} has an unsupported extension {suffix!r}; use {sorted(_READERS)}"
        )
    try:
        return reader(path)
    except Exception as exc:  # the readers raise many library-specific errors for malformed files
        if "corresponds to no data" in str(exc):
            raise ValueError(f"{role} set is empty ({path})") from None
        raise ValueError(f"{role} data: could not read {path}: {str(exc).splitlines()[0][:200]}") from None


def _decode_lists(dataset: datasets.Dataset, column: str, role: str, path: str) -> datasets.Dataset:
    """CSV cannot hold lists: accept a JSON-encoded list in ``perturbed_answer``."""
    if column not in dataset.column_names or dataset.num_rows == 0:
        return dataset
    if isinstance(dataset[0][column], list):
        return dataset

    def decode(row):
        value = row[column]
        try:
            parsed = json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
            raise ValueError(f"{role} data: {path}: column {column!r} must be a list of strings")
        return {column: parsed}

    return dataset.map(decode)


def detect_schema(column_names, *, role: str = "data", path: str = "") -> str:
    """``qa`` when there are question+answer columns, ``text`` when there is a text column."""
    names = set(column_names)
    if set(QA_COLUMNS) <= names:
        return "qa"
    if set(TEXT_COLUMNS) <= names:
        return "text"
    raise ValueError(
        f"{role} data{(': ' + path) if path else ''}: needs columns 'question' and 'answer' (QA) or 'text' "
        f"(plain text); found {sorted(names)}"
    )


def validate_dataset(
    dataset: datasets.Dataset, *, schema: str = "auto", role: str = "data", path: str = ""
) -> str:
    """Check columns and values; returns the schema (``qa`` or ``text``)."""
    if schema not in SCHEMAS:
        raise ValueError(f"schema: expected one of {SCHEMAS}, got {schema!r}")
    if isinstance(dataset, list):
        if not dataset:
            raise ValueError(f"{role} set is empty")
        dataset = datasets.Dataset.from_list(dataset)
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"{role} data: expected a datasets.Dataset or a list of dicts, got {type(dataset).__name__}"
        )
    where = f" ({path})" if path else ""
    if dataset.num_rows == 0:
        raise ValueError(f"{role} set is empty{where}")
    found = detect_schema(dataset.column_names, role=role, path=path) if schema == "auto" else schema
    required = QA_COLUMNS if found == "qa" else TEXT_COLUMNS
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{role} data{where}: missing required column(s) {missing}; found {dataset.column_names}"
        )
    for column in required:
        for row, value in enumerate(dataset[column]):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{role} data{where}: row {row} has an empty or non-text {column!r}")
    return found


def load_dataset_file(
    path: str | os.PathLike, *, schema: str = "auto", role: str = "data"
) -> datasets.Dataset:
    """Load and validate a local data set (``.json``/``.jsonl``/``.csv``/``.parquet`` or a saved dir).

    ``schema``: ``qa`` (``question``, ``answer``; optional ``paraphrased_answer`` and a
    ``perturbed_answer`` list), ``text`` (``text``), or ``auto``. ``role`` names the set in errors.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{role} data: {path} does not exist")
    dataset = _read(path, role)
    dataset = _decode_lists(dataset, "perturbed_answer", role, path)
    validate_dataset(dataset, schema=schema, role=role, path=path)
    return dataset
