"""Data: local data files, prompt formatting and batching (and, re-exported from
:mod:`wagle.synthetic`, the bundled benchmarks)."""

from wagle.synthetic import (
    HOLDOUT_OF,
    HOLDOUT_SPLITS,
    RETAIN_OF,
    SPLITS,
    benchmark_split,
    generate_benchmark,
    generate_holdout,
    generate_rows,
    hazard_corpus,
    hazard_multiple_choice,
    write_benchmark,
)

from .batching import collate_examples, encode_dataset, make_dataloader, pad_id_of
from .format import (
    IGNORE_INDEX,
    PROMPT_FORMATS,
    PromptFormat,
    encode_qa,
    encode_text,
    format_answer,
    format_question,
    get_prompt_format,
    pad_batch,
)
from .loading import detect_schema, load_dataset_file, validate_dataset

__all__ = [
    "HOLDOUT_OF",
    "HOLDOUT_SPLITS",
    "IGNORE_INDEX",
    "PROMPT_FORMATS",
    "PromptFormat",
    "RETAIN_OF",
    "SPLITS",
    "benchmark_split",
    "collate_examples",
    "detect_schema",
    "encode_dataset",
    "encode_qa",
    "encode_text",
    "format_answer",
    "format_question",
    "generate_benchmark",
    "generate_holdout",
    "generate_rows",
    "get_prompt_format",
    "hazard_corpus",
    "hazard_multiple_choice",
    "load_dataset_file",
    "make_dataloader",
    "pad_batch",
    "pad_id_of",
    "validate_dataset",
    "write_benchmark",
]
