"""Reading compiled HLO in tests: which collectives a program runs, and how large they are."""

from __future__ import annotations

import math
import re

_COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
_OP = re.compile(r"= (\(?[^=]*?\)?) (" + "|".join(_COLLECTIVES) + r")(?:-start)?\(")


def collectives(hlo_text: str) -> list[tuple[str, int]]:
    """``(op, elements)`` for every collective in ``hlo_text``: the largest array it produces.

    >>> collectives("%a = f32[12,3]{1,0} all-gather(%p), dimensions={0}")
    [('all-gather', 36)]
    """
    out = []
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if m:
            shapes = re.findall(r"\w+\[([\d,]*)\]", m.group(1))
            sizes = [math.prod(int(x) for x in dims.split(",") if x) for dims in shapes]
            out.append((m.group(2), max(sizes, default=0)))
    return out
