"""fer.evaluate: scores come out in FER2013's class order, whatever order a model stores."""

from __future__ import annotations

import numpy as np
import pytest

from fer.errors import FerError
from fer.evaluate import to_canonical
from fer.labels import CLASS_NAMES


def test_columns_are_reordered_by_class_name():
    """A model that stores neutral first still scores neutral as class 6."""
    own_order = ["neutral", *CLASS_NAMES[:-1]]
    probabilities = np.eye(7, dtype=np.float32)[:1]  # all mass on the model's column 0
    assert to_canonical(probabilities, own_order).argmax(axis=1).tolist() == [6]


def test_a_model_with_foreign_class_names_is_refused_by_name():
    """A model trained on other labels fails with one line naming them, not a traceback."""
    with pytest.raises(FerError, match=r"classes \['contempt'\] are not FER2013 classes"):
        to_canonical(np.ones((1, 7)), [*CLASS_NAMES[:-1], "contempt"])
