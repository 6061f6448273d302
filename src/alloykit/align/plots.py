"""PNG plots of linear paths (matplotlib, imported only here: the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path

from alloykit.analysis.plots import _pyplot

_STYLE = {"naive": ("tab:red", "o"), "weight_matching": ("tab:blue", "s"), "activation_matching": ("tab:green", "^")}


def plot_paths(paths: dict[str, dict], out: str | Path, title: str = "") -> Path:
    """Loss and accuracy against alpha, one line per path (``alloykit.align.lmc.path`` results)."""
    plt = _pyplot()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for name, p in paths.items():
        base = name.split("+")[0]
        color, marker = _STYLE.get(base, ("tab:gray", "."))
        ls = "--" if name.endswith("+repair") else "-"
        label = f"{name} (barrier {100 * p['accuracy_barrier']:.1f} pts / {p['loss_barrier']:.3f})"
        axes[0].plot(p["alpha"], p["loss"], ls=ls, color=color, marker=marker, ms=4, label=label)
        axes[1].plot(p["alpha"], [100 * a for a in p["accuracy"]], ls=ls, color=color, marker=marker, ms=4, label=name)
    axes[0].set_ylabel("loss")
    axes[1].set_ylabel("accuracy (%)")
    for ax in axes:
        ax.set_xlabel("alpha (0 = model A, 1 = model B)")
        ax.grid(alpha=0.3)
    rows = (len(paths) + 2) // 3
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=7, frameon=False,
               title="path (accuracy barrier / loss barrier)", title_fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.045 * rows, 1, 1))
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
