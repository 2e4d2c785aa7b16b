#!/usr/bin/env bash
# The core of the suite (pytest -m core: training, kill-and-resume, checkpoints, precision, models, losses,
# installing) on Colab's Python and torch, with Colab's versions of everything it shares with the project
# (tests/fixtures/colab), not constraints.txt's. Not part of .ci/run (its 20 min budget holds the full suite
# on 3.11 and torch 2.13.0); run it by hand, or as a second CI job, after a dependency bump:
#
#   PY=python3.13 tools/colab_check.sh                 # Colab 2026-08-19: Python 3.13, torch 2.11.0
#   PY=python3.12 RUNTIME=2026.07 tools/colab_check.sh # Colab 2026.07:    Python 3.12, torch 2.11.0, numpy 2.0.2
#
# TORCH is what pip installs as Colab's torch: by default torch==2.11.0 from PyPI, a CUDA build (530 MB, plus
# about 3 GB of CUDA libraries), which runs on the CPU. A wheel file path works too. VENV is kept between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3.13}
RUNTIME=${RUNTIME:-2026-08-19}
TORCH=${TORCH:-torch==2.11.0}
VENV=${VENV:-${TMPDIR:-/tmp}/orchestrator-colab-$RUNTIME}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m bench.colab --runtime "$RUNTIME" --constraints > "$VENV/colab-constraints.txt"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH" -c "$VENV/colab-constraints.txt"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$VENV/colab-constraints.txt" -e '.[test]'
"$VENV/bin/python" -c "import sys, torch, numpy; print('Python', sys.version.split()[0], '| torch', torch.__version__, '| numpy', numpy.__version__)"
exec "$VENV/bin/python" -m pytest -m core "$@"
