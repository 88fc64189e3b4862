"""The map in README: the analysis packages build on mllm and grounding, never on each other."""

from __future__ import annotations

import pytest

ANALYSES = ("probes", "misalign", "pruning")


@pytest.mark.parametrize("package", ANALYSES)
def test_analysis_packages_build_on_mllm_and_grounding_only(repo_root, package):
    for path in (repo_root / package).rglob("*.py"):
        text = path.read_text()
        for other in (*ANALYSES, "minillava"):
            if other != package:
                assert f"import {other}" not in text and f"from {other}" not in text, (path.name, other)
