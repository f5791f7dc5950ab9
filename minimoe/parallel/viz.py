"""A picture of one all-to-all: every rank's send buffer, cut into one block per destination,
and every rank's receive buffer, one block per source. Returns a matplotlib Figure (no pyplot)."""

import seaborn as sns
from matplotlib.figure import Figure

from minimoe.viz import _array


def all_to_all_diagram(traffic, title: str = "Dispatch all-to-all: token copies per (source, destination)") -> Figure:
    """traffic [W, W]: token copies rank s sends to rank r (row s, column r), e.g. the `sent`
    rows of every rank's ExchangeStats. Left: rank s's send buffer, sorted by destination.
    Right: rank r's receive buffer, sorted by source. Colours are the source rank, so each
    colour leaves one rank on the left and is spread over all ranks on the right; combine is the
    same picture read from right to left."""
    counts = _array("traffic", traffic, ndim=2)
    world = counts.shape[0]
    if counts.shape != (world, world) or (counts < 0).any():
        raise ValueError(f"traffic must be a square [W, W] matrix of counts >= 0, got shape {counts.shape}")
    colours = sns.color_palette("colorblind", world)
    widest = max(counts.sum(1).max(), counts.sum(0).max(), 1)
    fig = Figure(figsize=(11, 1.0 + 0.6 * world))
    axes = fig.subplots(1, 2, sharey=True)
    panels = (("send buffers, sorted by destination", counts, "to"),
              ("receive buffers, sorted by source", counts.T, "from"))
    for ax, (name, rows, word) in zip(axes, panels, strict=True):
        for rank in range(world):
            left = 0.0
            for peer in range(world):
                width = rows[rank, peer]
                source = rank if word == "to" else peer
                ax.barh(rank, width, left=left, color=colours[source], edgecolor="white", height=0.7)
                if width >= 0.08 * widest:
                    ax.text(left + width / 2, rank, f"{word} {peer}\n{int(width)}", ha="center", va="center",
                            fontsize=8)
                left += width
        ax.set(title=name, xlabel="token copies (rows)", xlim=(0, widest * 1.02))
    axes[0].set(ylabel="rank", yticks=range(world))
    axes[0].invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    return fig
