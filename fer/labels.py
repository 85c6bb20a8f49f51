"""The one canonical list of emotion classes.

Everything in fer maps labels to this order *by name*. The order is the one the
original ``fer2013.csv`` uses for its integer ``emotion`` column, so CSV labels
are indices into it; folder names of the image layout are looked up by name.
"""

CLASS_NAMES: tuple[str, ...] = (
    "angry",
    "disgust",
    "fear",
    "happy",
    "sad",
    "surprise",
    "neutral",
)
NUM_CLASSES = len(CLASS_NAMES)
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}

IMAGE_SIZE = 48  # FER2013 images are 48x48 grayscale.
