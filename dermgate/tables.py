"""Plain-text tables for the command line (``dermgate jobs list``, the demo's results)."""

from __future__ import annotations

from collections.abc import Sequence


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Left-aligned columns, a dashed rule under the headers; None prints as empty."""
    cells = [[str(c) if c is not None else "" for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(out)
