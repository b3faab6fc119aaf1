"""``python run.py mode=analyze``: the paper's phenomena on the configured model and the task's real prompts.

The first ``analyze.limit`` documents of each task are prepared exactly as the evaluation prepares them (processor,
chat template, prompt; :func:`vtw.pipeline.layer_search.task_samples`) and analysed by :func:`vtw.analysis.analyze`.
Writes into the job directory ``analysis.json`` (every number, the verdict), ``attention_share.png``,
``migration.png`` and ``attention_map.png``; prints the verdict; logs the figures and a per-layer table to W&B when
the logger is on.

Cost per prompt: two full forwards (one with hooks that keep each layer's input, one for the KL curve, as the layer
search), the recomputation of every layer's attention scores (its q/k projections: about a sixth of a layer's
matmuls), and text-only passes through the deep layers for each withdrawal layer.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..analysis import PARTS, Analysis, analyze, verdict
from ..io import atomic_write_bytes, atomic_write_json
from .schema import Config

log = logging.getLogger("vtw")
FIGURES = ("attention_share.png", "migration.png", "attention_map.png")
_COLORS = {"vision": "tab:red", "sink": "tab:gray", "text": "tab:blue"}


def run_analyze(spec: Config, out_dir: str | Path) -> tuple[Analysis, str]:
    """Load the model, analyse the prompts, write the files; returns ``(analysis, verdict)``."""
    from .evaluate import build_task_manager, check_tasks, make_model
    from .layer_search import task_samples

    out = Path(out_dir)
    tm = build_task_manager(spec.dataset)
    check_tasks(tm, spec.dataset.tasks)
    lm = make_model(spec)
    result = analyze(lm.model, task_samples(lm, tm, spec.dataset.tasks, spec.analyze.limit))
    text = verdict(result, spec.vtw.search.eta)
    atomic_write_json(
        out / "analysis.json",
        {"model": spec.model.name, "dataset": spec.dataset.name, "tasks": list(spec.dataset.tasks),
         "eta": spec.vtw.search.eta, "verdict": text, **result.to_dict()},
    )  # fmt: skip
    plot_analysis(result, out, eta=spec.vtw.search.eta, title=f"{spec.model.name} on {spec.dataset.name}")
    return result, text


def _save(fig, path: Path) -> Path:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_analysis(result: Analysis, out: Path, *, eta: float, title: str) -> list[Path]:
    """The three figures of :data:`FIGURES` (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    layers = list(range(result.num_layers))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (name, shares) in zip(axes, (("text queries", result.text_shares), ("last token", result.last_shares))):
        for part in PARTS:
            mean, std = shares[f"{part}_mean"], shares[f"{part}_std"]
            ax.plot(layers, mean, marker="o", color=_COLORS[part], label=f"to {part} tokens")
            ax.fill_between(layers, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=_COLORS[part], alpha=0.15)  # fmt: skip
        ax.set_title(f"attention of the {name}")
        ax.set_xlabel("decoder layer")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("share of attention (mean ± std)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}: where attention goes ({result.samples} prompts, spread over prompts and heads)")
    paths = [_save(fig, out / FIGURES[0])]

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.semilogy(
        layers, [max(k, 1e-12) for k in result.kl], marker="o", color="tab:purple", label="mean KL(P_K || P_full)"
    )
    ax.axhline(eta, color="black", linestyle="--", linewidth=1, label=f"eta = {eta:g}")
    ax.set_xlabel("withdrawal layer K (vision tokens withdrawn before K)")
    ax.set_ylabel("KL of the next-token distribution")
    ax.grid(True, alpha=0.3)
    twin = ax.twinx()
    twin.plot(layers, result.top1_agreement, marker="s", color="tab:green", label="top-1 = full model")
    twin.set_ylim(-0.05, 1.05)
    twin.set_ylabel("top-1 agreement with the full model")
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="center right")
    ax.set_title(f"{title}: information migration ({result.samples} prompts)")
    paths.append(_save(fig, out / FIGURES[1]))

    fig, ax = plt.subplots(figsize=(10, 4))
    image = ax.imshow(result.last_map, aspect="auto", cmap="viridis", interpolation="nearest",
                      norm=matplotlib.colors.LogNorm(vmin=1e-4, vmax=1.0))  # fmt: skip
    if result.vision_positions:
        lo, hi = min(result.vision_positions), max(result.vision_positions)
        ax.axvline(lo - 0.5, color="white", linestyle="--", linewidth=1)
        ax.axvline(hi + 0.5, color="white", linestyle="--", linewidth=1)
    ax.set_xlabel("prompt position (key); between the dashed lines: the vision tokens")
    ax.set_ylabel("decoder layer")
    fig.colorbar(image, ax=ax, label="attention of the last token (mean over heads)")
    ax.set_title(f"{title}: the last prompt token's attention, first prompt")
    paths.append(_save(fig, out / FIGURES[2]))
    return paths
