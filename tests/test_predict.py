"""fer.predict: any image file becomes a 48x48 grayscale input; faces are found first on request."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import (
    brightness_model,
    encode_image,
    large_grey_png,
    run_short_of_memory,
    subset_of_shared_archive,
)

import fer.predict
from fer.data import read_splits, to_model_input
from fer.errors import FerError
from fer.evaluate import predict_probabilities
from fer.labels import CLASS_NAMES
from fer.models import get_spec
from fer.predict import detect_faces, predict_files, read_grayscale, read_model_inputs


@pytest.fixture(scope="module")
def model():
    return get_spec("default").build()


def test_images_of_any_size_and_colour_are_classified(tmp_path, model):
    """A colour PNG, a large JPEG and a 48x48 grey image each get one prediction."""
    rng = np.random.default_rng(0)
    files = {
        "colour.png": encode_image(rng.integers(0, 256, (120, 90, 3), dtype=np.uint8), ".png"),
        "large.jpg": encode_image(rng.integers(0, 256, (400, 300), dtype=np.uint8), ".jpg"),
        "small.png": encode_image(rng.integers(0, 256, (48, 48), dtype=np.uint8), ".png"),
    }
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    predictions = predict_files(model, paths)
    assert [p.file for p in predictions] == [str(p) for p in paths]
    for p in predictions:
        assert set(p.probabilities) == set(CLASS_NAMES) and p.box is None
        assert p.emotion == max(p.probabilities, key=p.probabilities.get)
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-3)


def test_each_file_gets_the_prediction_of_its_own_image(tmp_path):
    """A dark, a bright colour and a bright grey file, to a model that calls dark faces sad
    and bright ones angry: each prediction is its own file's (an untrained model scores
    every image alike, so the test above cannot tell a mix-up)."""
    files = {"dark.png": encode_image(np.zeros((60, 60), np.uint8)),
             "bright.jpg": encode_image(np.full((100, 80, 3), 255, np.uint8), ".jpg"),
             "bright.png": encode_image(np.full((48, 48), 255, np.uint8))}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    predictions = predict_files(brightness_model(list(CLASS_NAMES)),
                                [tmp_path / name for name in files])
    assert [(Path(p.file).name, p.emotion) for p in predictions] == [
        ("dark.png", "sad"), ("bright.jpg", "angry"), ("bright.png", "angry")]


def test_a_model_that_outputs_nan_is_named_not_reported_as_angry(tmp_path):
    """A model whose training diverged gives NaN scores: an error saying so, not `angry`
    (the argmax of NaN) nor NaN in the --json document, which strict parsers reject."""
    diverged = get_spec("default").build()
    for layer in diverged.layers:
        layer.set_weights([np.full_like(w, np.nan) for w in layer.get_weights()])
    (tmp_path / "face.png").write_bytes(encode_image(np.full((48, 48), 128, np.uint8), ".png"))
    with pytest.raises(FerError, match=r"non-finite scores \(NaN or infinity\) for 1 of 1 "
                                       r"images: it was not trained to a usable state"):
        predict_files(diverged, [tmp_path / "face.png"])


def test_a_face_at_the_photos_edge_is_boxed_inside_the_photo(monkeypatch):
    """Scaling a box found on the shrunk copy back to the photo's pixels rounds each side:
    at the edge of a 4001x3001 photo the box would end a pixel past it (3950 + 52), and
    its crop and the box printed would not be the photo's. The box is cut at the edge."""
    class EdgeCascade:
        def detectMultiScale(self, image, **options):  # noqa: N802 (OpenCV's name)
            assert image.shape == (1920, 2560)
            return np.array([[2527, 1887, 33, 33]], np.int32)  # touching the copy's corner

    monkeypatch.setattr(fer.predict, "_face_cascade", lambda: EdgeCascade())
    assert detect_faces(np.full((3001, 4001), 128, np.uint8)) == [(3950, 2949, 51, 52)]


def test_colour_is_converted_to_grayscale_and_resized(tmp_path):
    """Model input is always 48x48 uint8 grayscale, by OpenCV's luminance weights (not one
    channel: blue, green and red differ here), resized whole: the left two sevenths of a
    photo wider than high stay its left two sevenths, neither cropped to a square (at the
    centre, the left or the right) nor turned."""
    colour = np.empty((30, 70, 3), np.uint8)
    colour[:, :20] = (40, 120, 220)  # B, G, R
    colour[:, 20:] = (200, 30, 10)
    (tmp_path / "c.png").write_bytes(encode_image(colour, ".png"))
    gray = read_grayscale(tmp_path / "c.png")
    assert gray.shape == (30, 70) and gray.dtype == np.uint8
    luminance = cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY).astype(int)  # 141 | 43
    assert np.abs(gray.astype(int) - luminance).max() <= 1  # decoding rounds its own way
    model_input = to_model_input(gray)
    assert model_input.shape == (48, 48) and model_input.dtype == np.uint8
    assert np.abs(model_input[:, :12].astype(int) - 141).max() <= 1  # 20 of 70 columns: 13.7
    assert np.abs(model_input[:, 15:].astype(int) - 43).max() <= 1


def test_an_image_is_resized_for_prediction_as_it_was_for_training(tmp_path, model,
                                                                    monkeypatch):
    """`fer predict` feeds the model exactly the pixels training would have read from the
    same odd-sized file: one resize for both, so a saved model sees what it was trained on."""
    rng = np.random.default_rng(0)
    odd = rng.integers(0, 256, (30, 100), dtype=np.uint8)  # enlarged on one side
    for split in ("train", "test"):
        (tmp_path / "layout" / split / "happy").mkdir(parents=True)
        (tmp_path / "layout" / split / "happy" / "odd.png").write_bytes(encode_image(odd))
    trained_on = read_splits(tmp_path / "layout")["test"].images
    fed = []

    def spy(model, images, **options):
        fed.append(images.copy())
        return predict_probabilities(model, images, **options)

    monkeypatch.setattr(fer.predict, "predict_probabilities", spy)
    predict_files(model, [tmp_path / "layout" / "test" / "happy" / "odd.png"])
    assert np.array_equal(fed[0], trained_on)


# A 19-byte header claiming 70000x70000 pixels: OpenCV raised cv2.error past its 2^30 limit.
HUGE_HEADER = b"P5\n70000 70000\n255\n"


@pytest.mark.parametrize("content", [b"hello", b"", HUGE_HEADER], ids=["text", "empty", "huge"])
def test_undecodable_file_is_named(tmp_path, model, content):
    (tmp_path / "notes.txt").write_bytes(content)
    with pytest.raises(FerError, match=r"notes\.txt: not a decodable image"):
        predict_files(model, [tmp_path / "notes.txt"])


def sparse_file(path: Path, size: int) -> None:
    """A file of ``size`` zero bytes that takes no disk space."""
    with path.open("wb") as handle:
        handle.truncate(size)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("name", ["big.png", "big.tif"])
def test_a_photo_too_large_for_the_memory_free_is_named_as_such(tmp_path, name):
    """Where 200 MB more may be mapped, a valid 20000x20000 PNG (400 MB decoded) and a
    400 MB file (under MAX_IMAGE_BYTES, so it is read) are too large for the memory free:
    one error line, not "not a decodable image" (OpenCV's out-of-memory error had been taken
    for a file it cannot read) nor a traceback (reading the file had not been guarded)."""
    photo = tmp_path / name
    if name == "big.png":
        photo.write_bytes(large_grey_png(20000, 20000))
    else:
        sparse_file(photo, 400 * 2**20)
    done = run_short_of_memory(
        "from pathlib import Path\nfrom fer.errors import FerError\n"
        "from fer.predict import read_grayscale",
        f"try:\n    read_grayscale(Path({str(photo)!r}))\nexcept FerError as exc:\n    print(exc)")
    assert done.returncode == 0, done.stderr
    assert f"{photo}: too large to decode in the memory free here" in done.stdout


def test_a_jpeg_cut_short_is_refused_not_classified(tmp_path, model):
    """A download or copy cut short: OpenCV would be free to fill the missing rows with grey,
    a face that is not there; it refuses it (OpenCV 4.14), and so must fer."""
    photo = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 256, (480, 640), np.uint8))[1]
    (tmp_path / "cut.jpg").write_bytes(photo.tobytes()[:len(photo) * 9 // 10])
    with pytest.raises(FerError, match=r"cut\.jpg: not a decodable image"):
        predict_files(model, [tmp_path / "cut.jpg"])


def test_what_is_no_image_file_is_refused_unread(tmp_path):
    """A pipe (or /dev/zero) would be read for ever, a file larger than any image OpenCV
    decodes (a video given with `fer predict media/*`) whole into memory: both are named
    before a byte is read."""
    os.mkfifo(tmp_path / "pipe.png")
    sparse = tmp_path / "movie.jpg"
    sparse_file(sparse, fer.predict.MAX_IMAGE_BYTES + 1)
    for path, message in ((tmp_path / "pipe.png", "not a regular file"),
                          (sparse, "1,073,741,825 bytes, more than fer reads as one image")):
        with pytest.raises(FerError, match=rf"{path.name}: {message}"):
            read_grayscale(path)


def test_every_unreadable_file_is_named_at_once(tmp_path):
    """Two bad files among three: one error lists both, so the user fixes them in one go
    instead of meeting the second after rerunning for the first."""
    (tmp_path / "good.png").write_bytes(encode_image(np.full((48, 48), 90, np.uint8)))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "big.pgm").write_bytes(HUGE_HEADER)
    paths = [tmp_path / "notes.txt", tmp_path / "good.png", tmp_path / "big.pgm"]
    with pytest.raises(FerError) as raised:
        read_model_inputs(paths)
    lines = str(raised.value).splitlines()
    assert lines[0] == "2 of 3 files cannot be read as images:"
    assert [line.split(": ")[0].strip() for line in lines[1:]] == [str(paths[0]), str(paths[2])]
    assert read_model_inputs(paths[1:2])[0].pixels.shape == (48, 48)


def test_only_the_48x48_inputs_are_kept_while_files_are_read(tmp_path):
    """A large photo is decoded, reduced and dropped before the next file is read: what is
    kept is a 48x48 copy, not the photo or a view of it (each 12-megapixel one held 12 MB)."""
    rng = np.random.default_rng(0)
    (tmp_path / "photo.png").write_bytes(encode_image(rng.integers(0, 256, (900, 1200),
                                                                    dtype=np.uint8)))
    (inputs,) = read_model_inputs([tmp_path / "photo.png"])
    assert inputs.pixels.shape == (48, 48) and inputs.pixels.base is None  # a copy, not a view
    assert inputs.file == str(tmp_path / "photo.png") and inputs.box is None


def test_a_48x48_face_is_kept_as_a_copy_not_a_view_of_its_photo(tmp_path, monkeypatch):
    """A face box of exactly 48x48 needs no resize: kept as a slice, it would hold the
    whole photo in memory until prediction."""
    (tmp_path / "photo.png").write_bytes(encode_image(np.full((900, 1200), 90, np.uint8)))
    monkeypatch.setattr(fer.predict, "detect_faces", lambda gray: [(10, 20, 48, 48)])
    (face,) = read_model_inputs([tmp_path / "photo.png"], faces=True)
    assert face.pixels.shape == (48, 48) and face.pixels.base is None and face.box == (10, 20, 48, 48)


def test_the_face_cascade_is_parsed_once_per_process():
    """Parsing OpenCV's 1 MB cascade took 16 ms, more than finding the faces in a 640x480
    image (12 ms, measured): `fer predict --faces` on many files parses it once."""
    assert fer.predict._face_cascade() is fer.predict._face_cascade()


def test_faces_in_a_large_photo_are_found_on_a_shrunk_copy_and_boxed_in_its_pixels(
        monkeypatch, tmp_path):
    """A 48-megapixel photo: the cascade searched it whole for 20-36 s (measured); it now
    searches a copy of at most DETECTION_MAX_PIXELS, and the box it gives is in the
    photo's own pixels, around the face, for the full-size crop."""
    gray = cv2.imdecode(np.frombuffer(_a_test_face(tmp_path), np.uint8), cv2.IMREAD_GRAYSCALE)
    photo = np.random.default_rng(0).integers(100, 156, (6000, 8000), dtype=np.uint8)
    photo[1800:3400, 2600:4200] = cv2.resize(gray, (1600, 1600))
    searched = []
    cascade = fer.predict._face_cascade()

    class Spy:
        def detectMultiScale(self, image, **options):  # noqa: N802 (OpenCV's name)
            searched.append(image.shape)
            return cascade.detectMultiScale(image, **options)

    monkeypatch.setattr(fer.predict, "_face_cascade", lambda: Spy())
    (x, y, w, h), *_ = detect_faces(photo)
    assert searched == [(1920, 2560)]
    overlap = max(0, min(x + w, 4200) - max(x, 2600)) * max(0, min(y + h, 3400) - max(y, 1800))
    assert overlap / (w * h + 1600 * 1600 - overlap) > 0.5  # the box lies on the face
    detect_faces(np.full((1000, 12000), 128, np.uint8))  # a panorama: an area, not a side
    assert searched[1] == (640, 7680)


def _a_test_face(folder) -> bytes:
    """One happy face of the test split of ../shared/data/fer2013.zip (encoded)."""
    import zipfile

    archive = subset_of_shared_archive(folder / "faces.zip", train_per_class=0, test_per_class=1)
    with zipfile.ZipFile(archive) as handle:
        return handle.read(next(n for n in handle.namelist() if n.startswith("test/happy/")))


def test_no_faces_in_a_blank_image(tmp_path, model):
    """--faces on an image without faces gives no predictions instead of guessing."""
    (tmp_path / "blank.png").write_bytes(encode_image(np.full((200, 200), 128, np.uint8)))
    assert detect_faces(np.full((200, 200), 128, np.uint8)) == []
    assert predict_files(model, [tmp_path / "blank.png"], faces=True) == []


def test_predictions_are_named_in_the_models_own_class_order(tmp_path):
    """A model whose stored class order is not CLASS_NAMES' (another fer's, or a user's):
    each score is named by the model's own order, through a save and a load (a change to
    the fixed order would name every class wrongly and pass every other test)."""
    import keras

    from fer.labels import CLASS_NAMES
    from fer.models import ClassNames, load_model

    order = list(reversed(CLASS_NAMES))  # index 0 is neutral here, angry in CLASS_NAMES
    inputs = keras.Input((48, 48, 1))
    scores = keras.layers.Dense(len(order), kernel_initializer="zeros",
                                bias_initializer=keras.initializers.Constant(
                                    [3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0]))(
        keras.layers.Flatten()(inputs))
    outputs = ClassNames(order, name="class_names")(keras.layers.Softmax()(scores))
    keras.Model(inputs, outputs).save(tmp_path / "model.keras")
    model = load_model(tmp_path / "model.keras")
    (prediction,) = fer.predict.predict_inputs(
        model, [fer.predict.ModelInput(file="face.png", pixels=np.zeros((48, 48), np.uint8))])
    assert prediction.emotion == "neutral"
    assert list(prediction.probabilities) == order
    assert prediction.probabilities["neutral"] > prediction.probabilities["surprise"] > (
        prediction.probabilities["sad"]) > prediction.probabilities["angry"]
