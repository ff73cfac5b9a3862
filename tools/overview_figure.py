"""Draws img/dueb_overview.png, the method diagram of the README (matplotlib only)."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402


def box(ax, x, y, w, h, text, color):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=color, ec="#333",
                                lw=1.2))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9)


def arrow(ax, a, b, text="", color="#333"):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=12, color=color, lw=1.2))
    if text:
        ax.text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + 0.12, text, ha="center", fontsize=8,
                color=color)


def main(out=Path(__file__).resolve().parents[1] / "img" / "dueb_overview.png"):
    fig, ax = plt.subplots(figsize=(11, 5.2))
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 5.2)
    ax.axis("off")
    box(ax, 0.2, 3.7, 1.8, 0.8, "labelled x, y", "#e8f0fe")
    box(ax, 0.2, 1.9, 1.8, 1.0, "unlabelled u0, u1\n+ CutMix mask M", "#fef7e0")
    for i, (y, name) in enumerate(((3.3, "branch 1"), (1.1, "branch 2"))):
        box(ax, 3.0, y, 2.4, 1.1, f"{name}\nResNet v1c + ASPP decoder\nmean head | variance head",
            "#e6f4ea")
    arrow(ax, (2.0, 4.1), (3.0, 3.9))
    arrow(ax, (2.0, 4.0), (3.0, 1.8))
    arrow(ax, (2.0, 2.4), (3.0, 3.5), "teacher (no grad)", "#b06000")
    arrow(ax, (2.0, 2.3), (3.0, 1.5), "", "#b06000")
    box(ax, 6.2, 2.25, 2.2, 0.9, "pseudo labels\nintersection -> b1\nunion -> b2", "#fce8e6")
    arrow(ax, (5.4, 3.7), (6.2, 2.9), "mixed logits", "#b06000")
    arrow(ax, (5.4, 1.6), (6.2, 2.5), "", "#b06000")
    box(ax, 8.9, 3.6, 1.9, 1.1, "supervised\nCE / OHEM\n+ 0.5 A + 0.5 E", "#f3e8fd")
    box(ax, 8.9, 2.05, 1.9, 1.3, "unsupervised\nλ · conf-weighted CE\n+ A + E\non the mixed batch",
        "#f3e8fd")
    box(ax, 8.9, 0.4, 1.9, 1.2, "A: aleatoric MC loss\n(logits + N(0, var))\nE: energy term",
        "#ffffff")
    arrow(ax, (5.4, 4.0), (8.9, 4.1), "logits, var on x")
    arrow(ax, (8.4, 2.7), (8.9, 2.7))
    ax.text(5.5, 0.15, "student passes on mix(u0, u1, M) give the logits and variance used by "
            "the unsupervised terms", ha="center", fontsize=8, color="#555")
    fig.tight_layout()
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
