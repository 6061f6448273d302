"""PNG plots of an interference report (matplotlib, imported only here: the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alloykit.errors import AlloyError


def require_matplotlib() -> None:
    """Fail now, before any work, when plots are asked for and matplotlib is missing."""
    _pyplot()


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise AlloyError("plots need matplotlib: pip install 'alloykit[plot]' (or pass --no-plots)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_report(report: dict[str, Any], out_dir: str | Path, prefix: str = "analyze") -> list[Path]:
    """Cosine heatmap and per-layer curves; returns the files written."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names, k = report["models"], len(report["models"])
    files = []

    fig, axes = plt.subplots(1, 2, figsize=(4.2 * 2 + 1, 3.8))
    for ax, key, title, cmap, lim in ((axes[0], "cosine", "cosine similarity", "RdBu_r", (-1, 1)),
                                      (axes[1], "sign_conflict_pairwise", "opposite signs (fraction)", "Reds", (0, 1))):
        m = report["model"][key]
        im = ax.imshow(m, cmap=cmap, vmin=lim[0], vmax=lim[1])
        ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{m[i][j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(f"task vectors: {title}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    files.append(out_dir / f"{prefix}-heatmap.png")
    fig.savefig(files[-1], dpi=90)
    plt.close(fig)

    layers = report["layers"]
    x = list(range(len(layers)))
    labels = [layer["layer"].replace("layer ", "") for layer in layers]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    ax = axes[0][0]
    for i, j in pairs:
        ax.plot(x, [layer["cosine"][i][j] for layer in layers], marker=".", label=f"{names[i]} / {names[j]}")
    ax.set_title("pairwise cosine per layer", fontsize=9)
    if len(pairs) <= 8:
        ax.legend(fontsize=6)
    ax = axes[0][1]
    ax.plot(x, [layer["sign_conflict_rate"] for layer in layers], marker="o", color="tab:red", label="any two disagree")
    ax.plot(x, [layer["ties_elected_out_fraction"] for layer in layers], marker="s", color="tab:purple",
            label=f"TIES: kept entries elected out (density {report['density']})")
    ax.set_ylim(0, 1)
    ax.set_title("sign conflicts per layer (fraction)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1][0]
    for i in range(k):
        ax.plot(x, [layer["mean_abs"][i] for layer in layers], marker=".", label=names[i])
    ax.plot(x, [layer["conflict_mean_abs"] for layer in layers], ls="--", color="black", label="on conflicting entries")
    ax.set_yscale("log")
    ax.set_title("mean |task vector| per layer", fontsize=9)
    ax.legend(fontsize=6)
    ax = axes[1][1]
    for i in range(k):
        ax.plot(x, [layer["ties_trimmed_energy"][i] for layer in layers], marker=".", label=names[i])
    ax.set_ylim(0, 1)
    ax.set_title(f"TIES trim at density {report['density']}: share of squared norm removed", fontsize=9)
    ax.legend(fontsize=6)
    for ax in axes.flat:
        ax.set_xticks(x, labels, fontsize=7, rotation=45 if len(x) > 12 else 0)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    files.append(out_dir / f"{prefix}-layers.png")
    fig.savefig(files[-1], dpi=90)
    plt.close(fig)
    return files
