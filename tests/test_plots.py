"""fer.plots: what each figure draws, read back from the figure before it is saved (the
files alone would pass with swapped axes, columns normalised or curves mislabelled)."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from fer.labels import CLASS_NAMES
from fer.plots import plot_confusion_matrix, plot_curves


@pytest.fixture
def saved_figures(monkeypatch) -> list[Figure]:
    """Every figure fer.plots saves, in order (it is still written to its file)."""
    figures = []
    save = Figure.savefig

    def recorded(figure, *args, **kwargs):
        figures.append(figure)
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recorded)
    return figures


def test_the_confusion_matrix_is_normalised_per_true_class_in_rows(tmp_path, saved_figures):
    """Each row (a true class, labelled `true`) is shaded as fractions of that class's images,
    a class without images as an empty row; every cell is written with its count where it is
    drawn (column = predicted)."""
    matrix = np.zeros((7, 7), dtype=int)
    angry, disgust, fear = (CLASS_NAMES.index(name) for name in ("angry", "disgust", "fear"))
    matrix[angry, angry], matrix[angry, fear], matrix[fear, fear] = 3, 1, 2
    path = plot_confusion_matrix(matrix, CLASS_NAMES, tmp_path / "confusion_matrix.png")

    assert path.stat().st_size > 0
    axis = saved_figures[0].axes[0]
    shaded = np.asarray(axis.images[0].get_array())
    assert shaded[angry].tolist() == pytest.approx([0.75 if c == angry else 0.25 if c == fear
                                                    else 0 for c in range(7)])
    assert shaded[fear, fear] == 1 and shaded[disgust].sum() == 0
    assert (axis.get_ylabel(), axis.get_xlabel()) == ("true", "predicted")
    assert [label.get_text() for label in axis.get_yticklabels()] == list(CLASS_NAMES)
    written = {(round(text.get_position()[1]), round(text.get_position()[0])): text.get_text()
               for text in axis.texts}
    assert written == {(row, col): str(count) for (row, col), count in np.ndenumerate(matrix)}


def test_curves_draw_each_history_under_its_own_label(tmp_path, saved_figures):
    """Loss left, accuracy right, epochs from 1; training solid and validation dotted in the
    same colour; an ensemble's members each named, one colour per member."""
    first = {"loss": [1.5, 1.2, 1.0], "val_loss": [1.6, 1.4, 1.3],
             "accuracy": [0.4, 0.5, 0.6], "val_accuracy": [0.35, 0.45, 0.5]}
    second = {metric: [value + 0.01 for value in values] for metric, values in first.items()}
    plot_curves([first, second], tmp_path / "curves.png")
    plot_curves([first], tmp_path / "single.png")

    ensemble, single = saved_figures
    for axis, metric in zip(ensemble.axes, ("loss", "accuracy"), strict=True):
        lines = {line.get_label(): line for line in axis.get_lines()}
        assert list(lines) == [f"member {n} {kind} {metric}"
                               for n in (1, 2) for kind in ("train", "validation")]
        for number, history in ((1, first), (2, second)):
            train = lines[f"member {number} train {metric}"]
            validation = lines[f"member {number} validation {metric}"]
            assert train.get_xdata().tolist() == [1, 2, 3]
            assert train.get_ydata().tolist() == history[metric]
            assert validation.get_ydata().tolist() == history[f"val_{metric}"]
            assert (train.get_linestyle(), validation.get_linestyle()) == ("-", ":")
            assert validation.get_color() == train.get_color()
        assert (lines[f"member 1 train {metric}"].get_color()
                != lines[f"member 2 train {metric}"].get_color())
        assert axis.get_ylabel() == metric
    assert [line.get_label() for line in single.axes[0].get_lines()] == [
        "train loss", "validation loss"]
