"""Accuracy vs TFLOPs: one point per withdrawal layer, the baseline (K = L) marked, the Pareto frontier drawn."""

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

    One series per (model, dataset); each point is labelled with its ``K``; the baseline is a star; the series'
    frontier is a dashed step line.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import io

    import matplotlib.pyplot as plt

    series: dict[tuple, list] = {}
    for r in rows:
        series.setdefault((r["model"], r["dataset"]), []).append(r)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, ((model, dataset), rs) in enumerate(series.items()):
        c = colors[n % len(colors)]
        rs = sorted(rs, key=lambda r: r["tflops"])
        pts = [(r["tflops"], r["accuracy"]) for r in rs]
        front = [rs[i] for i in pareto_frontier(pts)]
        base = [r for r in rs if r["layer"] is None or r["layer"] == r["num_layers"]]
        other = [r for r in rs if r not in base]
        ax.scatter(
            [r["tflops"] for r in other],
            [r["accuracy"] for r in other],
            color=c,
            label=f"{model} / {dataset}",
            zorder=3,
        )
        if base:
            ax.scatter(
                [r["tflops"] for r in base],
                [r["accuracy"] for r in base],
                color=c,
                marker="*",
                s=220,
                edgecolors="black",
                zorder=4,
                label=f"{model} / {dataset}: baseline (K=L)",
            )
        if len(front) > 1:
            ax.step(
                [r["tflops"] for r in front],
                [r["accuracy"] for r in front],
                where="post",
                color=c,
                linestyle="--",
                alpha=0.7,
                zorder=2,
            )
        for r in rs:
            ax.annotate(
                "K=L" if r in base else f"K={r['layer']}",
                (r["tflops"], r["accuracy"]),
                textcoords="offset points",
                xytext=(5, 5),
                fontsize=8,
            )
    metrics = sorted({r["primary_metric"] for r in rows if r.get("primary_metric")})
    ax.set_xlabel("TFLOPs per sample (exact matmul count, prefill + decode)")
    ax.set_ylabel(", ".join(metrics) or "accuracy")
    ax.set_title("Accuracy vs compute per withdrawal layer (dashed: Pareto frontier)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
