"""Bundled synthetic benchmarks, generated deterministically (no download).

* :mod:`wagle.synthetic.authors`: the TOFU-style benchmark of fictitious authors (forget/retain/
  general/holdout splits) that ``wagle demo`` and the tests use;
* :mod:`wagle.synthetic.hazard`: a WMDP-shaped multiple-choice set about fictitious agents, and the
  same facts as a text corpus.
"""

from .authors import (
    FORGET_SPLITS,
    HOLDOUT_OF,
    HOLDOUT_SPLITS,
    RETAIN_OF,
    SPLITS,
    benchmark_split,
    generate_benchmark,
    generate_holdout,
    generate_rows,
    write_benchmark,
)
from .hazard import hazard_corpus, hazard_multiple_choice

__all__ = [
    "FORGET_SPLITS",
    "HOLDOUT_OF",
    "HOLDOUT_SPLITS",
    "RETAIN_OF",
    "SPLITS",
    "benchmark_split",
    "generate_benchmark",
    "generate_holdout",
    "generate_rows",
    "hazard_corpus",
    "hazard_multiple_choice",
    "write_benchmark",
]
