"""How `fer predict --faces` frames a face, against how FER2013 frames it.

Each image is enlarged 4x (192x192) and set in a border of its own edge pixels (64 px a
side: context for the detector, and room for a wider crop), then searched with the same
Haar cascade `fer predict --faces` uses. Printed, for the validation split (carved from
train as the model's run carved it, by its manifest): how many faces were found; the
detected box's side and centre as fractions of the face's FER2013 frame; the accuracy of
the original 48x48 images of the faces found, and of their detected crops widened (or
narrowed) by each margin on each side, as `fer predict --faces` would score them. The
margin is chosen there; the test split is read once, at the end, for the originals and the
chosen margin's crops. Usage:

    python benchmarks/face_crop_benchmark.py --data ../shared/data/fer2013.zip --model runs/<id>/model.keras
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from common import BENCH_CACHE, machine_line

from fer.config import DEFAULT_SEED, DEFAULT_VAL_FRACTION
from fer.data import Split, load_dataset, to_model_input
from fer.evaluate import predict_labels
from fer.predict import detect_faces

ENLARGE = 4
BORDER = 64  # px of the enlarged image's edge repeated around it: a box widened by up to
# a third of its side stays on real or repeated pixels


def framed(image: np.ndarray) -> np.ndarray:
    """A 48x48 face enlarged and set in a border of its own edge pixels."""
    import cv2

    side = image.shape[0] * ENLARGE
    big = cv2.resize(image, (side, side), interpolation=cv2.INTER_LINEAR)
    return cv2.copyMakeBorder(big, BORDER, BORDER, BORDER, BORDER, cv2.BORDER_REPLICATE)


def crop(canvas: np.ndarray, box: tuple[int, int, int, int], margin: float) -> np.ndarray:
    """The square around ``box``'s centre, its side widened by ``margin`` of it on each side
    (negative: narrowed), as the model's 48x48 input."""
    import cv2

    x, y, w, h = box
    half = max(w, h) * (0.5 + margin)
    left, top = round(x + w / 2 - half), round(y + h / 2 - half)
    right, bottom = round(x + w / 2 + half), round(y + h / 2 + half)
    room = BORDER  # repeat the edge further where a wide margin runs past the canvas
    padded = cv2.copyMakeBorder(canvas, room, room, room, room, cv2.BORDER_REPLICATE)
    return to_model_input(padded[top + room:bottom + room, left + room:right + room])


def detected(split: Split) -> tuple[np.ndarray, list[np.ndarray], list[tuple[int, int, int, int]]]:
    """The indices of the images a face is found in, their enlarged canvases, and each one's
    largest box (the first `fer predict --faces` prints)."""
    found, canvases, boxes = [], [], []
    for index, image in enumerate(split.images):
        canvas = framed(image)
        faces = detect_faces(canvas)
        if faces:
            found.append(index)
            canvases.append(canvas)
            boxes.append(faces[0])
    return np.asarray(found, dtype=np.int64), canvases, boxes


def print_framing(boxes: list[tuple[int, int, int, int]], frame: int) -> None:
    """The detected boxes' sides and centres as fractions of the FER2013 frame."""
    sides = np.array([max(w, h) for _, _, w, h in boxes]) / frame
    centres = np.array([((x + w / 2 - BORDER) / frame, (y + h / 2 - BORDER) / frame)
                        for x, y, w, h in boxes])
    print("detected box side / FER2013 frame: median {:.3f} (10th-90th percentile "
          "{:.3f}-{:.3f}); centre at x {:.3f}, y {:.3f} of the frame (medians)".format(
              *np.quantile(sides, [0.5, 0.1, 0.9]), *np.median(centres, axis=0)))


def crop_accuracy(model, split: Split, found, canvases, boxes, margin: float) -> float:
    crops = np.stack([crop(c, b, margin) for c, b in zip(canvases, boxes, strict=True)])
    return float(np.mean(predict_labels(model, crops) == split.labels[found]))


def split_of_run(model: Path) -> dict:
    """The validation fraction and split seed the model was trained with, from the manifest
    of its run folder (a model elsewhere: `fer train`'s defaults): validation carved
    otherwise would hold images the model trained on."""
    manifest = model.parent / "manifest.json"
    parameters = json.loads(manifest.read_text())["parameters"] if manifest.is_file() else {}
    return {"val_fraction": parameters.get("val_fraction", DEFAULT_VAL_FRACTION),
            "split_seed": parameters.get("split_seed", DEFAULT_SEED)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True, help="a trained fer model")
    parser.add_argument("--margins", type=float, nargs="+",
                        default=[-0.1, -0.05, 0.0, 0.05, 0.1, 0.2])
    args = parser.parse_args()
    if any(not -0.4 < margin <= 0.3 for margin in args.margins):
        parser.error("--margins: expected fractions above -0.4 and at most 0.3")

    from fer.models import load_model

    print(machine_line(), flush=True)
    split = split_of_run(args.model)
    print(f"validation: {split['val_fraction']:g} of train, split seed {split['split_seed']}",
          flush=True)
    dataset = load_dataset(args.data, cache_dir=BENCH_CACHE, val_fraction=split["val_fraction"],
                           seed=split["split_seed"])
    model = load_model(args.model)
    frame = dataset.test.images.shape[1] * ENLARGE
    validation = dataset.validation
    found, canvases, boxes = detected(validation)
    if not len(found):
        raise SystemExit(f"no face found in any of the {len(validation)} validation images")
    print(f"faces found in {len(found)} of {len(validation)} validation images")
    print_framing(boxes, frame)
    original = np.mean(predict_labels(model, validation.images[found]) == validation.labels[found])
    print(f"the original 48x48 images of those faces: validation accuracy {original:.4f}")
    scores = {}
    for margin in args.margins:
        scores[margin] = crop_accuracy(model, validation, found, canvases, boxes, margin)
        print(f"detected crop, margin {margin:+.2f} of its side each side: validation "
              f"accuracy {scores[margin]:.4f}", flush=True)
    chosen = max(scores, key=scores.__getitem__)

    test = dataset.test  # read once, for the margin validation chose
    found, canvases, boxes = detected(test)
    if not len(found):
        raise SystemExit(f"no face found in any of the {len(test)} test images")
    original = np.mean(predict_labels(model, test.images[found]) == test.labels[found])
    print(f"test, read once: faces found in {len(found)} of {len(test)} images; the original "
          f"48x48 images of those faces {original:.4f}; their detected crops at the margin "
          f"chosen on validation, {chosen:+.2f}, "
          f"{crop_accuracy(model, test, found, canvases, boxes, chosen):.4f}")


if __name__ == "__main__":
    main()
