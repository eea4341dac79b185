#!/usr/bin/env bash
# Install learn2learn 0.2.0 (its last release) into the Python given as $1.
#
# Its sdist ships Cython-generated C that does not compile on Python >= 3.11, so we regenerate
# the C of its three extensions (learn2learn/data/*.pyx) with a current Cython and install the
# folder without build isolation (the build needs the Cython and setuptools of this venv).
# Only learn2learn itself comes from source (`--no-binary learn2learn`: with `:all:` pip also compiled
# Cython from source for the build environment, most of a cold install's time); everything else comes as
# wheels. `pip install learn2learn` would pull its declared dependencies (gsutil and its tree, qpth, cvxpy,
# ...) that nothing here imports; installed with --no-deps, it gets only what `import learn2learn` and
# its vision benchmarks really import: numpy, scipy, requests, tqdm, gym, pillow (torch/torchvision are
# there already).
set -euo pipefail
arg="${1:?usage: install_learn2learn.sh PATH/TO/python}"
# absolute path without resolving the venv's symlink to the base interpreter
PY="$(cd "$(dirname "$arg")" && pwd)/$(basename "$arg")"
VERSION=0.2.0

if "$PY" -c "import learn2learn, sys; sys.exit(learn2learn.__version__ != '$VERSION')" 2>/dev/null; then
    echo "learn2learn $VERSION already installed"
    exit 0
fi

"$PY" -m pip install -q --prefer-binary "cython>=3" setuptools wheel numpy scipy requests tqdm gym pillow
# `import learn2learn` imports gym, whose gym_notices add-on prints a deprecation banner to stderr
# on every import; gym skips it silently when the add-on is absent.
"$PY" -m pip uninstall -q -y gym-notices
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-deps --no-build-isolation --no-binary learn2learn -d "$work" "learn2learn==$VERSION"
tar -xzf "$work/learn2learn-$VERSION.tar.gz" -C "$work"
src="$work/learn2learn-$VERSION"
cython_bin="$(dirname "$PY")/cythonize"
"$cython_bin" -3 -f "$src"/learn2learn/data/*.pyx
"$PY" -m pip install -q --no-build-isolation --no-deps "$src"
( cd "$work" && "$PY" -c "import learn2learn; print('learn2learn', learn2learn.__version__, 'installed')" )
