"""The README's "Use CEM in your own training loop" snippet runs as written."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_training_loop_snippet_runs(capsys):
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = _python_blocks(f.read())
    snippet = [b for b in blocks if "cem_loss" in b and "fit_mixture" in b]
    assert len(snippet) == 1, "README must hold exactly one CEM training-loop snippet"
    namespace: dict = {}
    exec(compile(snippet[0], "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("epoch")]
    assert len(lines) == 2
    import math

    for ln in lines:
        loss = float(re.search(r"loss ([-\d.na]+)", ln).group(1))
        bits = float(re.search(r"leakage estimate ([-\d.na]+) bits", ln).group(1))
        assert math.isfinite(loss) and math.isfinite(bits) and bits > 0
    assert namespace["mixture"].centroids.shape == (10, 5, 16 * 16 * 8)
