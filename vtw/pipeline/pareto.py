"""Accuracy vs TFLOPs: one curve per method (and model / dataset), the baseline (no reduction) starred, each curve's
Pareto frontier dashed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..io import atomic_write_bytes


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (lower or equal cost and higher accuracy, or cheaper and as good).

    Args:
        points: ``(tflops, accuracy)`` pairs; lower TFLOPs and higher accuracy are better.

    Returns:
        Indices of the frontier, cheapest first.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    frontier, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            frontier.append(i)
            best = points[i][1]
    return frontier


def plot_pareto(rows, path: str | Path) -> Path:
    """Write the plot of ``rows`` (summary row dicts with ``accuracy``, ``tflops`` and ``tflops_full``) to ``path``.

    x: each point's TFLOPs as a percentage of the full model's on the same samples (``tflops / tflops_full``), so
    models and datasets share one axis and 100 % is the baseline. One series per (model, dataset, method); each point
    is labelled with its budget (``F=0.5``, matched-compute sweeps) or the method's setting (``K=3``, ``keep=0.25``,
    ...), placed where it overlaps no other label (a label that fits nowhere is left out: the summary table has
    every setting); the baseline (a row without reduction, whichever method's job evaluated it) is a star per
    (model, dataset); each series' frontier is a dashed line; the legend sits outside the axes.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import io

    import matplotlib.pyplot as plt

    series: dict[tuple, list] = {}
    bases: dict[tuple, list] = {}
    for r in rows:
        key = (r["model"], r["dataset"])
        if _is_baseline(r):
            bases.setdefault(key, []).append(r)
        else:
            series.setdefault((*key, r.get("method") or "vtw"), []).append(r)
    several = len(bases) > 1 or len({k[:2] for k in series}) > 1
    fig, ax = plt.subplots(figsize=(10, 6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = []
    for n, ((model, dataset, method), rs) in enumerate(series.items()):
        c, marker = colors[n % len(colors)], "os^Dv<>ph"[(n // len(colors)) % 9]
        rs = sorted(rs, key=share)
        front = [rs[i] for i in pareto_frontier([(share(r), r["accuracy"]) for r in rs])]
        ax.plot([share(r) for r in rs], [r["accuracy"] for r in rs], marker, color=c, zorder=3,
                label=f"{method} ({model} / {dataset})" if several else method)  # fmt: skip
        if len(front) > 1:
            ax.plot([share(r) for r in front], [r["accuracy"] for r in front], color=c, linestyle="--", alpha=0.7,
                    zorder=2)  # fmt: skip
        labels += [(share(r), r["accuracy"], _point_label(r), c) for r in rs]
    for (model, dataset), bs in bases.items():
        ax.scatter([share(r) for r in bs[:1]], [r["accuracy"] for r in bs[:1]], color="gold", marker="*", s=260,
                   edgecolors="black", zorder=4, label=f"baseline ({model} / {dataset})")  # fmt: skip
    metrics = sorted({r["primary_metric"] for r in rows if r.get("primary_metric")})
    ax.set_xlabel("TFLOPs per sample, % of the full model's (exact matmul count, prefill + decode)")
    ax.set_ylabel(", ".join(metrics) or "accuracy")
    ax.set_title("Accuracy vs compute per method (dashed: each method's Pareto frontier)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    _place_labels(fig, ax, labels)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def share(row: dict) -> float:
    """A row's TFLOPs as a percentage of the full model's (its ``tflops`` where ``tflops_full`` is missing)."""
    full = row.get("tflops_full")
    return 100.0 * row["tflops"] / full if full else row["tflops"]


#: where a point's label may go, in points from the point, tried in order until one overlaps no placed label
_OFFSETS = ((5, 4), (5, -11), (-5, 4), (-5, -11), (6, 13), (6, -20), (-6, 13), (-6, -20), (10, -3), (-10, -3),
            (8, 22), (8, -29), (-8, 22), (-8, -29))  # fmt: skip


def _place_labels(fig, ax, labels) -> None:
    """Annotate each ``(x, y, text, color)`` at the first offset of :data:`_OFFSETS` whose box overlaps no label
    already placed (nor leaves the axes); where none does, not at all."""
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed = []
    for x, y, text, color in labels:
        for dx, dy in _OFFSETS:
            note = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7, color=color,
                               ha="left" if dx >= 0 else "right")  # fmt: skip
            box = note.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(b) for b in placed):
                placed.append(box)
                break
            note.remove()


def _is_baseline(row: dict) -> bool:
    return row.get("variant") == "baseline" or row.get("layer") is None or row.get("layer") == row.get("num_layers")


def _point_label(row: dict) -> str:
    """``F=0.5`` for a point of a matched-compute sweep; else the method's setting: ``K=3`` for a layer, or its label
    without the method name (``K=2 keep=0.25``), cut at 24 characters."""
    if row.get("budget") not in (None, ""):
        return f"F={float(row['budget']):g}"
    label = row.get("method_label") or ""
    name = row.get("method") or ""
    text = label[len(name) :].strip() if label.startswith(name) else label
    text = text or f"K={row.get('layer')}"
    return text if len(text) <= 24 else text[:23] + "…"
