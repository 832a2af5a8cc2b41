"""Tables (plain text and Markdown) and the P4 chart."""

from __future__ import annotations

import math
from pathlib import Path


def fmt(value: object) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "never"
        if math.isnan(value):
            return "-"
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}"
    return str(value)


def table(rows: list[dict], markdown: bool = False) -> str:
    if not rows:
        return "(no rows)"
    headers = list(rows[0])
    cells = [[fmt(row.get(h, "")) for h in headers] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda values: "  ".join(v.rjust(w) for v, w in zip(values, widths, strict=False))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def p4_chart(rows: list[dict], path: Path) -> None:
    """Three panels against concurrent clients: streams running at once, TTFB p99, gap p99."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("running at once", "streams running at once"),
        ("TTFB p99 ms", "TTFB p99 (ms)"),
        ("gap p99 ms", "inter-token gap p99 (ms)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, (key, label) in zip(axes, panels, strict=False):
        for name in dict.fromkeys(r["workers"] for r in rows):
            mine = [r for r in rows if r["workers"] == name]
            ys = [r[key] if math.isfinite(r[key]) else float("nan") for r in mine]
            ax.plot([r["streams"] for r in mine], ys, marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle("Worker classes: 2-second streams (20 tokens/s), 10 s window")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
