#!/usr/bin/env bash
# Create the virtual environment and install the toolkit, never letting pip fetch a second torch.
#
# Where python3 already has torch (a GPU machine with its CUDA build), the venv sees python3's
# packages and keeps that torch. Elsewhere torch==2.13.0 is installed first (on this project's
# machines pip finds a local CPU wheel). Either way pip is then pinned to the torch now installed,
# so no dependency can pull the multi-gigabyte CUDA build. scripts/constraints.txt pins the transformers (and
# TransformerLens) that the test suite last passed with; pyproject.toml keeps the supported ranges.
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
  if "$python" -c "import torch" 2>/dev/null; then
    # Let the venv see python3's own packages (its torch above all). A .pth file rather than
    # --system-site-packages, because python3 may itself be a venv (as on the GPU machines).
    "$python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
      "$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/base-packages.pth"
  fi
fi
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "$venv/bin/python" -m pip install -q torch==2.13.0
fi
"$venv/bin/python" -c "import torch; print('torch==' + torch.__version__)" > "$venv/torch-constraint.txt"
"$venv/bin/python" -m pip install -q -c "$venv/torch-constraint.txt" -c "$(dirname "$0")/constraints.txt" -e ".[dev,notebooks]"
if "$venv/bin/python" -c "import torchvision" 2>/dev/null && ! "$python" -c "import torchvision" 2>/dev/null; then
  echo "setup: torchvision was installed into $venv; the toolkit must never pull it in" >&2
  exit 1
fi
echo "setup: $(cat "$venv/torch-constraint.txt") in $venv"
