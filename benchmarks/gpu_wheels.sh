#!/usr/bin/env bash
# Wheels for a GPU machine without a package registry (Python 3.12): the project's dependencies that
# its image lacks (datasets, rouge-score and what they need). Run on a machine with PyPI access, copy
# .whl (git-ignored) along with the source tree; benchmarks/gpu_session.sh installs it into /tmp/site.
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
mkdir -p "$DEST/pyarrow"
PLATFORMS=(--python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
# Pure-Python wheels missing from the image (versions as tested here with CI's install)
python3 -m pip download -q --no-deps --only-binary=:all: "${PLATFORMS[@]}" -d "$DEST" \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 nltk==3.10.4 defusedxml==0.7.1
# rouge-score is published as an sdist only: build its (pure-Python) wheel here
python3 -m pip wheel -q --no-deps -w "$DEST" rouge-score==0.1.2
# datasets 5.2 needs pyarrow >= 24; installed there only if the image's pyarrow is older
python3 -m pip download -q --no-deps --only-binary=:all: "${PLATFORMS[@]}" -d "$DEST/pyarrow" pyarrow==24.0.0
du -sh "$DEST"
