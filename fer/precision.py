"""Choose the numeric precision for training and inference from the hardware, never blindly.

bfloat16 mixed precision trains about 2x faster than float32 on CPUs with native bf16
instructions (AVX512_BF16 / AMX_BF16; 2.0-2.6x in BENCHMARKS.md, 1.4-1.7x in the project's
first measurements) and ~10x slower on CPUs without them; on GPUs,
mixed float16 is the fast path. Separately, training asks for TensorFlow's oneDNN CPU
kernels wherever TensorFlow would leave them off (see ``prefer_onednn``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, MutableMapping
from pathlib import Path

from fer.errors import FerError

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
ONEDNN_SWITCH = "TF_ENABLE_ONEDNN_OPTS"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo does not exist)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def prefer_onednn(environ: MutableMapping[str, str] = os.environ) -> None:
    """For training: ask for TensorFlow's oneDNN CPU kernels unless the user set
    ``TF_ENABLE_ONEDNN_OPTS``.

    TensorFlow turns them on by itself only where the CPU has AVX512_VNNI, AVX512_BF16,
    AVX_VNNI or AMX (``DefaultOneDnnPolicy`` in its tensorflow/core/util/port.cc), so the
    bf16 CPUs already have them. On an AVX2-only CPU they are off, and turning them on made
    training faster at the same accuracy; one-image inference got several times slower, so
    inference is left to TensorFlow's own choice (figures: BENCHMARKS.md). Call it before
    TensorFlow is imported: TensorFlow reads the switch once, at import.
    """
    environ.setdefault(ONEDNN_SWITCH, "1")


def onednn_enabled() -> bool | None:
    """Whether the imported TensorFlow runs its oneDNN kernels (None where it cannot say).

    TensorFlow has no public call for this; the private one is guarded so that a future
    release only loses the record, never the run.
    """
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None


def has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def slow_here(precision: str, *, flags: set[str] | None = None, gpu: bool | None = None,
              onednn: bool | None = None) -> str | None:
    """Why ``precision`` runs slowly on this machine (None where it does not): a run
    resumed elsewhere keeps the precision it began with, and bf16 without the CPU's bf16
    instructions, or without TensorFlow's oneDNN kernels, trained 10x slower than float32
    (BENCHMARKS.md)."""
    flags = cpu_flags() if flags is None else flags  # read once, for both questions
    here = choose_precision("auto", flags=flags, gpu=gpu, onednn=onednn)
    if precision == "mixed_float16" and here != "mixed_float16":
        return "this machine has no GPU, and CPUs emulate float16"
    if precision == "mixed_bfloat16" and here == "float32":
        if flags & BF16_FLAGS:
            return f"TensorFlow's oneDNN kernels are off here ({ONEDNN_SWITCH}=0)"
        return f"this CPU has no bf16 instructions ({', '.join(sorted(BF16_FLAGS))})"
    return None


def check_precision(requested: str, *, what: str = "--precision") -> None:
    """Refuse an unknown precision name (cheap: no TensorFlow import)."""
    if requested not in PRECISIONS:
        raise FerError(f"{what} {requested}: expected one of {', '.join(PRECISIONS)}")


def choose_precision(requested: str = "auto", *, flags: set[str] | None = None,
                     gpu: bool | None = None, onednn: bool | None = None) -> str:
    """Resolve ``auto`` to mixed_float16 (GPU), mixed_bfloat16 (bf16 CPU) or float32."""
    return resolve_precision(requested, flags=flags, gpu=gpu, onednn=onednn)[0]


def resolve_precision(requested: str = "auto", *, flags: set[str] | None = None,
                      gpu: bool | None = None, onednn: bool | None = None) -> tuple[str, str]:
    """``choose_precision``'s answer and why, in words for a run's log: the user's choice,
    a GPU, or the CPU's bf16 flags found or not (a person wondering why a run is slow
    looks there first). ``flags``, ``gpu``, ``onednn``: None asks this machine.

    The bf16 instructions pay only through TensorFlow's oneDNN kernels: with them off
    (``TF_ENABLE_ONEDNN_OPTS=0``, which TensorFlow's start-up message suggests), bf16
    trained 9.5x slower than float32 on a bf16 CPU and scored no faster (BENCHMARKS.md,
    session 49), so ``auto`` is float32 there."""
    check_precision(requested)
    if requested != "auto":
        return requested, "as asked"
    if has_gpu() if gpu is None else gpu:
        return "mixed_float16", "auto: a GPU"
    present = sorted((cpu_flags() if flags is None else flags) & BF16_FLAGS)
    if present and (onednn_enabled() if onednn is None else onednn) is False:
        return "float32", (f"auto: the CPU has {', '.join(present)}, but TensorFlow's oneDNN "
                           f"kernels are off ({ONEDNN_SWITCH}=0), without which bf16 is slower")
    if present:
        return "mixed_bfloat16", f"auto: the CPU has {', '.join(present)}"
    return "float32", f"auto: no bf16 instructions found ({', '.join(sorted(BF16_FLAGS))})"


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Build layers under ``name``, then restore the previous global policy."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
