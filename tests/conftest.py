"""Shared fixtures: small datasets the tests generate, and a subset of the real archive."""

from __future__ import annotations

import os
import random
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from fer.data import Dataset, Split
from fer.labels import CLASS_NAMES

SHARED_ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fer2013.zip"

# The tests' servers are on loopback: urllib and httpx (the Prefect client) send even
# 127.0.0.1 through the proxy that http_proxy or https_proxy name unless no_proxy exempts it.
for _variable in ("no_proxy", "NO_PROXY"):
    os.environ[_variable] = ",".join(filter(None, [os.environ.get(_variable), "127.0.0.1",
                                                   "localhost"]))
# The tests name their S3 endpoint in AWS_ENDPOINT_URL; the machine's own S3 endpoint
# settings, which win over it, are not theirs.
for _variable in ("AWS_ENDPOINT_URL_S3", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
    os.environ.pop(_variable, None)

# A distinct grey level per class: a loaded image's pixel value reveals which class folder
# or CSV label it came from, so any swap of two classes shows up in the tests.
CLASS_SHADE = {name: 20 + 30 * i for i, name in enumerate(CLASS_NAMES)}


def shaded_image(class_name: str, *, size: int = 48, serial: int | None = None) -> np.ndarray:
    """The class's grey; with ``serial``, its last two pixels set from it, so that images of one
    class are not copies of each other (fer keeps copies on one side of a carved split)."""
    image = np.full((size, size), CLASS_SHADE[class_name], dtype=np.uint8)
    if serial is not None:
        image[-1, -2:] = divmod(serial, 256)
    return image


def encode_image(image: np.ndarray, suffix: str = ".png") -> bytes:
    import cv2

    ok, encoded = cv2.imencode(suffix, image)
    assert ok
    return encoded.tobytes()


def large_grey_png(width: int, height: int) -> bytes:
    """A valid 8-bit grey PNG of one shade, built row by row: a few hundred KB on disk for
    hundreds of megabytes decoded, without ever holding those pixels here."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    row = b"\x00" + b"\x80" * width  # filter byte 0, then mid-grey
    packer = zlib.compressobj()
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
            + chunk(b"IEND", b""))


# Caps this process's address space at what it maps now plus HEADROOM_MB, so that a large
# allocation fails as on a machine short of memory: the first lines of a script run by
# run_short_of_memory, after its imports (which map far more than they use).
CAP_MEMORY = """
import resource
_, hard = resource.getrlimit(resource.RLIMIT_AS)
mapped = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (mapped + HEADROOM_MB * 2**20, hard))
"""


def run_short_of_memory(imports: str, action: str, *, headroom_mb: int = 200):
    """Runs ``imports``, then ``action`` in a Python process that may map only
    ``headroom_mb`` more; returns the finished process (its output as text)."""
    import subprocess
    import sys

    script = "\n".join([imports, CAP_MEMORY.replace("HEADROOM_MB", str(headroom_mb)), action])
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)


def sharpened(model, *, scale: float = 100.0):
    """``model`` (a registry model: logits Dense, softmax, class names last) with its logits
    scaled, so that its scores depend on the image: an untrained model's are about 1/7
    everywhere, and a comparison within 2e-2 cannot tell a missing mirror view or member.
    How much depends on the random initial weights (the mirror's scores of ramp_faces
    differed by 0.01-0.16 over 15 builds): tests that need a margin seed the build
    (keras.utils.set_random_seed(3): about 0.23)."""
    logits = model.layers[-3]
    kernel, bias = logits.get_weights()
    logits.set_weights([kernel * scale, bias])
    return model


def sharpened_defaults(count: int) -> list:
    """``count`` builds of the default model, sharpened, in a row from Keras seed 3: weights
    whose scores differ by image by about 0.23 (see sharpened), the same on every run."""
    import keras

    from fer.models import get_spec

    keras.utils.set_random_seed(3)
    return [sharpened(get_spec("default").build()) for _ in range(count)]


def brightness_model(order: list[str]):
    """A model in class order ``order`` that calls a dark image (pixels 0) its column 4 and a
    bright one (255) its column 0: scores that depend on the image, unlike an untrained
    model's, whose every row is about 1/7 everywhere."""
    import keras

    from fer.models import ClassNames

    inputs = keras.Input((48, 48, 1))
    brightness = keras.layers.GlobalAveragePooling2D()(inputs)
    logits = keras.layers.Dense(
        len(order), kernel_initializer=keras.initializers.Constant(
            [[0.1, 0, 0, 0, 0, 0, 0]]),
        bias_initializer=keras.initializers.Constant([0, 0, 0, 0, 5.0, 0, 0]))(brightness)
    outputs = ClassNames(order, name="class_names")(keras.layers.Softmax()(logits))
    return keras.Model(inputs, outputs)


def ramp_faces(count: int, *, seed: int) -> np.ndarray:
    """float32 (count, 48, 48, 1) images bright on the left, dark on the right, with noise:
    their mirror images score differently, unlike noise alone's."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, 48)[None, None, :, None] * rng.uniform(0.3, 1, (count, 1, 1, 1))
    return (ramp + rng.integers(0, 40, (count, 48, 48, 1))).clip(0, 255).astype("float32")


def csv_row(label: int, image: np.ndarray, usage: str) -> str:
    return f"{label},{' '.join(map(str, image.ravel().tolist()))},{usage}"


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("emotion,pixels,Usage\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture
def shaded_csv(tmp_path) -> Path:
    """A CSV with 3 rows per class and usage, each image shaded by its class."""
    rows = [csv_row(label, shaded_image(name, serial=serial), usage)
            for serial, (usage, label, name) in enumerate(
                (usage, label, name) for usage in ("Training", "PublicTest", "PrivateTest")
                for label, name in enumerate(CLASS_NAMES) for _ in range(3))]
    return write_csv(tmp_path / "fer2013.csv", rows)


def write_image_tree(root: Path, *, per_class: int = 3, splits=("train", "test")) -> Path:
    """``root/<split>/<class>/<n>.png``, each image shaded by its class, none a copy of
    another."""
    serial = 0
    for split in splits:
        for name in CLASS_NAMES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                serial += 1
                (folder / f"{n}.png").write_bytes(encode_image(shaded_image(name, serial=serial)))
    return root


@pytest.fixture
def image_tree(tmp_path) -> Path:
    return write_image_tree(tmp_path / "layout")


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                handle.write(path, path.relative_to(folder).as_posix())
    return archive


def subset_of_shared_archive(target: Path, *, train_per_class: int, test_per_class: int) -> Path:
    """The first N + k images of the k-th class (CSV order) per split of
    ../shared/data/fer2013.zip, same layout.

    Every class has its own count, so a test comparing per-class counts catches any two
    classes swapped (while N stays under disgust's 436 train / 111 test images, which cap
    it). Skips the test where the archive is absent.
    """
    if not SHARED_ARCHIVE.exists():
        if os.environ.get("CI"):  # CI must run them: a green run without them proves little
            pytest.fail(f"{SHARED_ARCHIVE} not present (CI is set: these tests must run)")
        pytest.skip(f"{SHARED_ARCHIVE} not present")
    quota = {"train": train_per_class, "test": test_per_class}
    taken: dict[tuple[str, str], int] = {}
    with zipfile.ZipFile(SHARED_ARCHIVE) as source, zipfile.ZipFile(target, "w") as out:
        for name in source.namelist():
            parts = name.split("/")
            if len(parts) != 3 or not parts[2]:
                continue
            key = (parts[0], parts[1])
            if taken.get(key, 0) < quota[parts[0]] + CLASS_NAMES.index(parts[1]):
                out.writestr(name, source.read(name))
                taken[key] = taken.get(key, 0) + 1
    return target


@pytest.fixture(scope="session")
def fer_subset(tmp_path_factory) -> Path:
    """A stratified subset of the real archive for end-to-end tests.

    ``FER_TEST_TRAIN_PER_CLASS`` (default 60) and ``FER_TEST_TEST_PER_CLASS`` (default 20).
    """
    return subset_of_shared_archive(
        tmp_path_factory.mktemp("subset") / "fer2013-subset.zip",
        train_per_class=int(os.environ.get("FER_TEST_TRAIN_PER_CLASS", 60)),
        test_per_class=int(os.environ.get("FER_TEST_TEST_PER_CLASS", 20)))


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """An empty FER_DATA_DIR for the test (the user's cache is never touched)."""
    folder = tmp_path / "fer-data"
    monkeypatch.setenv("FER_DATA_DIR", str(folder))
    return folder


@pytest.fixture
def disk_events(monkeypatch) -> list[tuple[str, str]]:
    """What reaches the disk, in order, as ("fsync", path) and ("replace", source path):
    checks that bytes are flushed before the rename that names them."""
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        fsync(descriptor)

    def recording_replace(source, target):
        events.append(("replace", str(source)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return events


@pytest.fixture
def runs(tmp_path) -> Path:
    """The folder a test's run folders are made in (tests/run_folders.py: make_run)."""
    return tmp_path / "runs"


def assert_labels_match_shades(split) -> None:
    """Every image carries its class's shade: fails if any two classes were swapped."""
    for image, label in zip(split.images, split.labels, strict=True):
        assert int(image[0, 0]) == CLASS_SHADE[CLASS_NAMES[label]]


def square_split(per_class: int, seed: int) -> Split:
    """Noisy images whose class is the size of a bright centred square (6 to 42 pixels).

    Not a uniform shade per class: the default model standardises each image, which would
    erase it. A centred square survives that, mirroring and small shifts.
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(7), per_class)
    images = rng.integers(40, 61, (len(labels), 48, 48))
    for image, label in zip(images, labels, strict=True):
        half = 3 + 3 * label
        image[24 - half:24 + half, 24 - half:24 + half] += 150
    return Split(images=images.astype(np.uint8), labels=labels)


@pytest.fixture(scope="module")
def tiny_dataset() -> Dataset:
    """Seven classes of squares the default model learns in a few epochs (fer.train tests)."""
    return Dataset(source="generated", sha256="0" * 64, train=square_split(20, 1),
                   validation=square_split(5, 2), test=square_split(5, 3))


def recorded_schedule_spans(monkeypatch) -> list[int]:
    """The number of steps each learning-rate schedule that fer.train builds spans (one per
    member trained in this process), recorded as fer.train asks for its optimisers."""
    import fer.train

    spans, build = [], fer.train.build_optimizer

    def recorded(kind, **options):
        spans.append(options["total_steps"])
        return build(kind, **options)

    monkeypatch.setattr(fer.train, "build_optimizer", recorded)
    return spans


@contextmanager
def python_random_drawn_meanwhile() -> Iterator[None]:
    """A thread drawing from Python's shared random module every half millisecond for the
    whole block, as a websockets keep-alive or a retry jitter may in a process that runs a
    flow (a model's build takes far longer; the pause leaves the cores to the training)."""
    stop = threading.Event()

    def draw() -> None:
        while not stop.wait(0.0005):
            random.random()

    drawer = threading.Thread(target=draw, daemon=True)
    drawer.start()
    try:
        yield
    finally:
        stop.set()
        drawer.join()
