"""Per-label reports shared by the classification heads: the most confused label pairs and a confusion plot that
stays readable at 150 labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def most_confused_pairs(matrix: np.ndarray, labels: list[str], k: int = 25) -> list[dict[str, Any]]:
    """The k largest off-diagonal cells: which gold label is most often predicted as which other label."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None)[::-1][:k]
    pairs = []
    for flat in order:
        gold, pred = np.unravel_index(flat, off.shape)
        if off[gold, pred] == 0:
            break
        support = int(matrix[gold].sum())
        pairs.append({"gold": labels[gold], "predicted": labels[pred], "count": int(off[gold, pred]),
                      "share_of_gold": round(float(off[gold, pred]) / max(support, 1), 4)})  # fmt: skip
    return pairs


def plot_confusions(matrix: np.ndarray, labels: list[str], pairs: list[dict], path: Path, title: str) -> None:
    """A full heatmap up to 30 labels; beyond that, a heatmap of the labels in the most-confused pairs plus a bar
    chart of those pairs, so the plot stays readable at CLINC150's 151 labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(labels) <= 30:
        keep = list(range(len(labels)))
    else:
        names = list(dict.fromkeys([p["gold"] for p in pairs] + [p["predicted"] for p in pairs]))[:30]
        keep = [labels.index(n) for n in names]
    sub = matrix[np.ix_(keep, keep)]
    fig, axes = plt.subplots(1, 2, figsize=(18, 8), gridspec_kw={"width_ratios": [1.2, 1]})
    ax = axes[0]
    ax.imshow(sub, cmap="Blues")
    ax.set_xticks(range(len(keep)), [labels[i] for i in keep], rotation=90, fontsize=7)
    ax.set_yticks(range(len(keep)), [labels[i] for i in keep], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    scope = "all labels" if len(keep) == len(labels) else f"{len(keep)} most-confused of {len(labels)} labels"
    ax.set_title(f"Confusion matrix ({scope}), {title}")
    ax = axes[1]
    top = pairs[:20][::-1]
    ax.barh(range(len(top)), [p["count"] for p in top], color="tab:red")
    ax.set_yticks(range(len(top)), [f"{p['gold']} → {p['predicted']}" for p in top], fontsize=7)
    ax.set_xlabel("errors")
    ax.set_title("Most confused pairs (gold → predicted)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
