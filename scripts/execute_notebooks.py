"""Execute the notebooks headless, in order, from the repository root; save executed copies under results/.

    python scripts/execute_notebooks.py [notebooks/01_layerwise_probe.ipynb ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def execute(path: Path, out_dir: Path) -> Path:
    notebook = nbformat.read(path, as_version=4)
    began = time.perf_counter()
    NotebookClient(notebook, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    out = out_dir / path.name
    nbformat.write(notebook, out)
    print(f"{path.name}: executed in {time.perf_counter() - began:.0f} s -> {out.relative_to(ROOT)}")
    return out


def main(argv: list[str]) -> int:
    paths = [Path(arg) for arg in argv] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    out_dir = ROOT / "results" / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in paths:
        execute(path.resolve(), out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
