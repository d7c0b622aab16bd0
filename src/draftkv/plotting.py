"""Line styles shared by every plot, so that no two methods look alike."""

from __future__ import annotations

_MARKERS = "osD^v<>P"


def save_scores(figure, axis, path, xlabel: str) -> None:
    """Label a plot of average scores, its legend right of it, and write it to `path`."""
    import matplotlib.pyplot as plt

    axis.set_xlabel(xlabel)
    axis.set_ylabel("average score")
    axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def line_styles(labels: list[str]) -> dict[str, dict]:
    """A distinct colour and marker for each label (keyword arguments of `Axes.plot`); dense is black."""
    import matplotlib  # the `eval` extra; only plotting needs it

    colours = matplotlib.colormaps["tab20"].colors
    styles, index = {}, 0
    for label in labels:
        if label.startswith("dense"):
            styles[label] = {"color": "black", "marker": "o", "linewidth": 2}
            continue
        # tab20 comes in dark-light pairs: all the dark ones first, then the light ones, so that
        # neighbouring methods differ in hue. A marker per label keeps even 20+ methods apart.
        colour = colours[(2 * index) % 20 + (2 * index // 20) % 2]
        styles[label] = {"color": colour, "marker": _MARKERS[index % len(_MARKERS)]}
        index += 1
    return styles
