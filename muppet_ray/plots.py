"""Figures as PNG bytes, drawn by matplotlib on its Agg backend (a cluster's nodes have no
display). Imported where a figure is drawn: matplotlib is slow to import and most processes
never draw."""

from __future__ import annotations

import io


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(figure) -> bytes:
    """`figure`, laid out, as PNG bytes; closed."""
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=100)
    pyplot().close(figure)
    return out.getvalue()
