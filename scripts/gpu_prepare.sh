#!/usr/bin/env bash
# Prepare what scripts/gpu_check.sh needs on a lent GPU machine, which reaches nothing outside itself: the
# Omniglot folder as one archive and the wheels of the packages its image lacks (jsonargparse), into .gpu/
# (git-ignored; pass `carry: [".gpu"]` to the device run). Run here, once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ROOT=${IMAML_OMNIGLOT_ROOT:-$(cd .. && pwd)/shared/omniglot}
mkdir -p .gpu/wheels
tar -C "$ROOT" -czf .gpu/omniglot.tar.gz omniglot-py
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 -d .gpu/wheels 'jsonargparse[signatures]>=4.27'
du -sh .gpu
