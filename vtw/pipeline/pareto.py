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
    """Write the plot of ``rows`` (summary row dicts with ``accuracy`` and ``tflops``) to ``path``.

    One series per (model, dataset, method); each point is labelled with the method's parameter (``K=3``,
    ``keep=0.25``, ...); the baseline (a row without reduction, whichever method's job evaluated it) is a star per
    (model, dataset); each series' frontier is a dashed step line.
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
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, ((model, dataset, method), rs) in enumerate(series.items()):
        c = colors[n % len(colors)]
        rs = sorted(rs, key=lambda r: r["tflops"])
        front = [rs[i] for i in pareto_frontier([(r["tflops"], r["accuracy"]) for r in rs])]
        ax.plot([r["tflops"] for r in rs], [r["accuracy"] for r in rs], "o", color=c, zorder=3,
                label=f"{method} ({model} / {dataset})" if len(bases) > 1 or len({k[:2] for k in series}) > 1
                else method)  # fmt: skip
        if len(front) > 1:
            ax.step([r["tflops"] for r in front], [r["accuracy"] for r in front], where="post", color=c,
                    linestyle="--", alpha=0.7, zorder=2)  # fmt: skip
        for r in rs:
            ax.annotate(_point_label(r), (r["tflops"], r["accuracy"]), textcoords="offset points", xytext=(5, 5),
                        fontsize=7, color=c)  # fmt: skip
    for (model, dataset), bs in bases.items():
        ax.scatter([r["tflops"] for r in bs[:1]], [r["accuracy"] for r in bs[:1]], color="gold", marker="*", s=260,
                   edgecolors="black", zorder=4, label=f"baseline ({model} / {dataset})")  # fmt: skip
    metrics = sorted({r["primary_metric"] for r in rows if r.get("primary_metric")})
    ax.set_xlabel("TFLOPs per sample (exact matmul count, prefill + decode)")
    ax.set_ylabel(", ".join(metrics) or "accuracy")
    ax.set_title("Accuracy vs compute per method (dashed: each method's Pareto frontier)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _is_baseline(row: dict) -> bool:
    return row.get("variant") == "baseline" or row.get("layer") is None or row.get("layer") == row.get("num_layers")


def _point_label(row: dict) -> str:
    """The method's setting: ``K=3`` for a layer, else its label without the method name (``K=2 keep=0.25``)."""
    label = row.get("method_label") or ""
    name = row.get("method") or ""
    text = label[len(name) :].strip() if label.startswith(name) else label
    return text or f"K={row.get('layer')}"
