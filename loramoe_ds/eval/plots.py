"""Utilisation figures (matplotlib, Agg backend: no display needed).

:func:`plot_utilisation` draws the LoRAMoE-paper style figure: x = decoder
layer, y = router weight share of the world-knowledge expert group, one line per
task type and a dashed 0.5 reference (an untrained or unbalanced router sits
near it). :func:`plot_expert_heatmap` shows each expert's mean probability per
layer (layers with fewer experts are blank on the right).
"""

from __future__ import annotations

import os
from typing import Any

_STYLE = {"knowledge": ("tab:blue", "o"), "downstream": ("tab:orange", "s")}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_utilisation(
    util: dict[str, Any], path: str | os.PathLike[str], title: str | None = None
) -> str:
    """Writes the knowledge-group share per layer as a PNG.

    Args:
        util: Result of :func:`~loramoe_ds.eval.utilisation.expert_utilisation`.
        path: Output file (``.png``).
        title: Figure title (default: a description of the metric).

    Returns:
        ``str(path)``.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    layers = util["layers"]
    for name, share in util["knowledge_share"].items():
        color, marker = _STYLE.get(name, (None, "^"))
        n_tok = util.get("tokens", {}).get(name)
        label = f"{name} inputs" + (f" ({n_tok} tokens)" if n_tok else "")
        ax.plot(layers, share, marker=marker, ms=3.5, lw=1.4, color=color, label=label)
    ax.axhline(0.5, color="gray", ls="--", lw=1, label="0.5 (no preference)")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("weight share of knowledge experts")
    lo = min([0.4, *(min(s) for s in util["knowledge_share"].values() if s)])
    hi = max([0.6, *(max(s) for s in util["knowledge_share"].values() if s)])
    pad = 0.05 * (hi - lo)
    ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad))
    ax.set_title(title or "Router weight on the world-knowledge group (experts e < E/2)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def plot_expert_heatmap(util: dict[str, Any], path: str | os.PathLike[str]) -> str:
    """Writes per-expert mean router probability (layer x expert), one panel per task type.

    Args:
        util: Result of :func:`~loramoe_ds.eval.utilisation.expert_utilisation`.
        path: Output file (``.png``).

    Returns:
        ``str(path)``.
    """
    import numpy as np

    plt = _pyplot()
    names = list(util["expert_probs"])
    N = util.get("null_experts", 0)
    E = max(util["num_experts"]) + N  # slots: LoRA experts, then null experts
    layers = util["layers"]
    fig, axes = plt.subplots(
        1,
        len(names),
        figsize=(2.2 + 1.6 * len(names) + 0.25 * E, 0.6 + 0.18 * len(layers)),
        dpi=120,
        squeeze=False,
    )
    grids = {}
    for name in names:
        grid_LE = np.full((len(layers), E), np.nan)
        for r, probs in enumerate(util["expert_probs"][name]):
            grid_LE[r, : len(probs)] = probs
        grids[name] = grid_LE
    vmin = min(np.nanmin(g) for g in grids.values())
    vmax = max(np.nanmax(g) for g in grids.values())
    for ax, name in zip(axes[0], names):
        im = ax.imshow(
            grids[name], aspect="auto", origin="lower", cmap="viridis", vmin=vmin, vmax=vmax
        )
        if len(set(util["num_experts"])) == 1:  # one boundary between the two groups
            ax.axvline((E - N + 1) // 2 - 0.5, color="white", lw=1.2)
            if N:
                ax.axvline(E - N - 0.5, color="white", lw=1.2, ls="--")
        ax.set_title(f"{name} inputs", fontsize=9)
        label = "expert (left half: knowledge group"
        label += f"; last {N}: null experts, knowledge group)" if N else ")"
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("decoder layer", fontsize=8)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=6)
        ax.set_xticks(range(E), [str(e) for e in range(E)], fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)
