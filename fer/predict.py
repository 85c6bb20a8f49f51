"""Classify image files of any size or colour, optionally face by face (Haar cascade)."""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fer.data import TOO_LARGE_FOR_MEMORY, UNDECODABLE, decode_grayscale, to_model_input
from fer.errors import FerError
from fer.evaluate import predict_probabilities
from fer.models import class_names_of

FACE_CASCADE = "haarcascade_frontalface_default.xml"
# Faces are looked for on a copy of at most this many pixels: the cascade took 20-36 s on a
# 48-megapixel photo and about 2 s at 2560x1920 (measured). An area, not a side, so that a
# panorama is not searched a few hundred pixels high. The smallest face found (24 px on the
# copy) is then 38 px in a 12-megapixel photo, 75 px in a 48-megapixel one. Faces are
# cropped from the full photo.
DETECTION_MAX_PIXELS = 2560 * 1920
MIN_FACE_PX = 24
# Larger files are refused unread: OpenCV decodes at most 2^30 pixels by default, 1 GiB as an
# 8-bit bitmap, and a face photo is a few MB, so a bigger file is most likely a video or a
# disk image given by mistake (`fer predict media/*`), which would be read whole into memory
# before OpenCV said so.
MAX_IMAGE_BYTES = 2**30


@dataclass(frozen=True)
class Prediction:
    """The emotion of one image, or of one face in it (``box`` = x, y, width, height)."""

    file: str
    emotion: str
    probabilities: dict[str, float]
    box: tuple[int, int, int, int] | None = None


def read_grayscale(path: str | Path) -> np.ndarray:
    """Any image file OpenCV can decode, as 8-bit grayscale at its own size; errors name
    the file as given (`./a.png` stays `./a.png`)."""
    try:
        found = os.stat(path)
        if not stat.S_ISREG(found.st_mode):  # a pipe or /dev/zero would never end
            raise FerError(f"{path}: not a regular file (a folder, pipe, socket or device); "
                           "expected an image file")
        if found.st_size > MAX_IMAGE_BYTES:
            raise FerError(f"{path}: {found.st_size:,} bytes, more than fer reads as one image "
                           f"({MAX_IMAGE_BYTES:,}); expected an image file")
        image = decode_grayscale(Path(path).read_bytes())
    except OSError as exc:
        raise FerError(f"{path}: cannot read image ({exc.strerror})") from None
    except MemoryError:  # reading the file or decoding it
        raise FerError(f"{path}: {TOO_LARGE_FOR_MEMORY}") from None
    if image is None:
        raise FerError(f"{path}: {UNDECODABLE}")
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
    """Frontal faces found by OpenCV's Haar cascade, largest first, as boxes in ``gray``'s
    own pixels (found on a copy shrunk to DETECTION_MAX_PIXELS)."""
    import cv2

    height, width = gray.shape
    scale = min(1.0, (DETECTION_MAX_PIXELS / (height * width)) ** 0.5)
    searched = gray if scale == 1.0 else cv2.resize(
        gray, (max(1, round(width * scale)), max(1, round(height * scale))),
        interpolation=cv2.INTER_AREA)
    found = _face_cascade().detectMultiScale(searched, scaleFactor=1.1, minNeighbors=5,
                                             minSize=(MIN_FACE_PX, MIN_FACE_PX))
    boxes = []
    for box in found:
        x, y, w, h = (round(int(v) / scale) for v in box)
        boxes.append((x, y, min(w, width - x), min(h, height - y)))
    return sorted(boxes, key=lambda b: b[2] * b[3], reverse=True)


@dataclass(frozen=True)
class ModelInput:
    """What the model is shown of one file: the 48x48 image, or a face cropped from it."""

    file: str
    pixels: np.ndarray  # 48x48 uint8
    box: tuple[int, int, int, int] | None = None


def read_model_inputs(paths: Sequence[str | Path], *, faces: bool = False) -> list[ModelInput]:
    """Each file as the model's 48x48 input (with ``faces``: one per face found), keeping
    no full-size image past its own file (1,000 12-megapixel photos would hold 12 GB).
    Each input is named as its file was given: a name given as text keeps its spelling
    (`./a.png`, where a Path would say `a.png`), which a script matches its records by.

    Every file that cannot be read or decoded is named in one FerError, so a user fixes
    them all in one go, before a model is loaded or run.
    """
    inputs, problems = [], []
    for path in paths:
        try:
            gray = read_grayscale(path)
        except FerError as exc:
            problems.append(str(exc))
            continue
        if faces:  # a copy: a 48x48 face is otherwise a view holding the whole photo
            inputs += [ModelInput(str(path), to_model_input(gray[y:y + h, x:x + w]).copy(),
                                  (x, y, w, h)) for x, y, w, h in detect_faces(gray)]
        else:
            inputs.append(ModelInput(str(path), to_model_input(gray)))
    if len(problems) > 1:
        raise FerError(f"{len(problems)} of {len(paths)} files cannot be read as images:\n  "
                       + "\n  ".join(problems))
    if problems:
        raise FerError(problems[0])
    return inputs


def predict_files(model, paths: Sequence[str | Path], *, faces: bool = False,
                  batch_size: int = 64) -> list[Prediction]:
    """One prediction per file, or one per detected face with ``faces=True``."""
    return predict_inputs(model, read_model_inputs(paths, faces=faces), batch_size=batch_size)


def predict_inputs(model, inputs: Sequence[ModelInput], *, batch_size: int = 64
                   ) -> list[Prediction]:
    """The model's prediction for each input of :func:`read_model_inputs`."""
    if not inputs:
        return []
    probabilities = predict_probabilities(model, np.stack([i.pixels for i in inputs]),
                                          batch_size=batch_size)
    names = class_names_of(model)
    return [
        Prediction(file=i.file, box=i.box, emotion=names[int(np.argmax(row))],
                   probabilities={n: round(float(p), 4) for n, p in zip(names, row, strict=True)})
        for i, row in zip(inputs, probabilities, strict=True)
    ]
