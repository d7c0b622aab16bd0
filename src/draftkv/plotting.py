"""Line styles shared by every plot, so that no two methods look alike."""

from __future__ import annotations

# tab20's colours; a marker per cycle of them, so even 20+ methods stay apart.
_COLOURS = ["#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896",
            "#9467bd", "#c5b0d5", "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7",
            "#bcbd22", "#dbdb8d", "#17becf", "#9edae5"]
_MARKERS = "osD^v<>P"


def line_styles(labels: list[str]) -> dict[str, dict]:
    """A distinct colour and marker for each label (keyword arguments of `Axes.plot`); dense is black."""
    styles, index = {}, 0
    for label in labels:
        if label.startswith("dense"):
            styles[label] = {"color": "black", "marker": "o", "linewidth": 2}
            continue
        # Step through the colours two at a time first: neighbours in tab20 are a dark and light pair.
        colour = _COLOURS[(2 * index) % 20 + (2 * index // 20) % 2]
        styles[label] = {"color": colour, "marker": _MARKERS[index % len(_MARKERS)]}
        index += 1
    return styles
