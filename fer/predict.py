"""Classify image files of any size or colour, optionally face by face (Haar cascade)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fer.data import decode_grayscale, to_model_input
from fer.errors import FerError
from fer.evaluate import predict_probabilities
from fer.models import class_names_of

FACE_CASCADE = "haarcascade_frontalface_default.xml"


@dataclass(frozen=True)
class Prediction:
    """The emotion of one image, or of one face in it (``box`` = x, y, width, height)."""

    file: str
    emotion: str
    probabilities: dict[str, float]
    box: tuple[int, int, int, int] | None = None


def read_grayscale(path: Path) -> np.ndarray:
    """Any image file OpenCV can decode, as 8-bit grayscale at its own size."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FerError(f"{path}: cannot read image ({exc.strerror})") from None
    image = decode_grayscale(data)
    if image is None:
        raise FerError(f"{path}: not a decodable image (expected jpg, png, bmp, webp, ... "
                       "of at most 2^30 pixels)")
    return image


@functools.cache
def _face_cascade():
    """OpenCV's frontal-face cascade, parsed once (a 1 MB XML), not once per image."""
    import cv2

    cascade = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / FACE_CASCADE))
    if cascade.empty():
        raise FerError(f"OpenCV's {FACE_CASCADE} is missing; install opencv-python-headless<5")
    return cascade


def detect_faces(gray: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Frontal faces found by OpenCV's Haar cascade, largest first."""
    found = _face_cascade().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5,
                                             minSize=(24, 24))
    boxes = [tuple(int(v) for v in box) for box in found]
    return sorted(boxes, key=lambda b: b[2] * b[3], reverse=True)


def read_images(paths: Sequence[Path]) -> list[np.ndarray]:
    """Every file as 8-bit grayscale; one FerError naming each file that cannot be read or
    decoded, so a user fixes them all in one go, before a model is loaded or run."""
    images, problems = [], []
    for path in paths:
        try:
            images.append(read_grayscale(path))
        except FerError as exc:
            problems.append(str(exc))
    if len(problems) > 1:
        raise FerError(f"{len(problems)} of {len(paths)} files are not images:\n  "
                       + "\n  ".join(problems))
    if problems:
        raise FerError(problems[0])
    return images


def predict_files(model, paths: Sequence[Path], *, faces: bool = False,
                  batch_size: int = 64) -> list[Prediction]:
    """One prediction per file, or one per detected face with ``faces=True``."""
    return predict_images(model, paths, read_images(paths), faces=faces, batch_size=batch_size)


def predict_images(model, paths: Sequence[Path], images: Sequence[np.ndarray], *,
                   faces: bool = False, batch_size: int = 64) -> list[Prediction]:
    """:func:`predict_files` for files already read by :func:`read_images`."""
    crops, origins = [], []
    for path, gray in zip(paths, images, strict=True):
        if faces:
            for x, y, w, h in detect_faces(gray):
                crops.append(to_model_input(gray[y:y + h, x:x + w]))
                origins.append((str(path), (x, y, w, h)))
        else:
            crops.append(to_model_input(gray))
            origins.append((str(path), None))
    if not crops:
        return []
    probabilities = predict_probabilities(model, np.stack(crops), batch_size=batch_size)
    names = class_names_of(model)
    return [
        Prediction(file=file, box=box, emotion=names[int(np.argmax(row))],
                   probabilities={n: round(float(p), 4) for n, p in zip(names, row, strict=True)})
        for (file, box), row in zip(origins, probabilities, strict=True)
    ]
