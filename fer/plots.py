"""Figures for a run: training curves and the confusion matrix (no pyplot global state)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from fer.errors import writing


def plot_curves(histories: Sequence[Mapping[str, Sequence[float]]], path: Path) -> Path:
    """Loss and accuracy per epoch, train solid and validation dotted, like the original;
    an ensemble's members share the axes, one colour each."""
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    for axis, metric in zip(figure.subplots(1, 2), ("loss", "accuracy"), strict=True):
        for number, history in enumerate(histories, start=1):
            member = f"member {number} " if len(histories) > 1 else ""
            epochs = np.arange(1, len(history[metric]) + 1)
            line, = axis.plot(epochs, history[metric], label=f"{member}train {metric}")
            if f"val_{metric}" in history:
                axis.plot(epochs, history[f"val_{metric}"], ":", color=line.get_color(),
                          label=f"{member}validation {metric}")
        axis.set(title=f"{metric.capitalize()} per epoch", xlabel="epoch", ylabel=metric)
        axis.legend()
    with writing(path):
        figure.savefig(path, dpi=100)
    return path


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
    """Row-normalised confusion matrix with counts, rows = true class."""
    figure = Figure(figsize=(7, 6), layout="constrained")
    axis = figure.subplots()
    totals = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    image = axis.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axis, label="fraction of true class")
    ticks = np.arange(len(class_names))
    axis.set(xticks=ticks, yticks=ticks, xticklabels=class_names, yticklabels=class_names,
             xlabel="predicted", ylabel="true", title="Confusion matrix (test split)")
    axis.tick_params(axis="x", labelrotation=45)
    for (row, col), count in np.ndenumerate(matrix):
        colour = "white" if normalised[row, col] > 0.5 else "black"
        axis.text(col, row, str(count), ha="center", va="center", color=colour, fontsize=8)
    with writing(path):
        figure.savefig(path, dpi=100)
    return path
