"""fer.precision: precision follows the hardware unless the user overrides it."""

import re
from pathlib import Path

import pytest

from fer.errors import FerError
from fer.precision import (
    ONEDNN_SWITCH,
    choose_precision,
    cpu_flags,
    prefer_onednn,
    resolve_precision,
    slow_here,
)

NO_BF16 = "auto: no bf16 instructions found (amx_bf16, avx512_bf16)"


@pytest.mark.parametrize(("requested", "flags", "gpu", "onednn", "precision", "why"), [
    ("auto", {"avx2", "avx512f"}, False, True, "float32", NO_BF16),
    ("auto", {"avx2"}, False, False, "float32", NO_BF16),
    ("auto", {"avx2", "avx512_bf16"}, False, True, "mixed_bfloat16",
     "auto: the CPU has avx512_bf16"),
    ("auto", {"amx_bf16"}, False, True, "mixed_bfloat16", "auto: the CPU has amx_bf16"),
    # TF_ENABLE_ONEDNN_OPTS=0: bf16 trained 9.5x slower than float32 on a bf16 CPU
    ("auto", {"avx512_bf16"}, False, False, "float32",
     "auto: the CPU has avx512_bf16, but TensorFlow's oneDNN kernels are off "
     "(TF_ENABLE_ONEDNN_OPTS=0), without which bf16 is slower"),
    ("auto", {"avx2"}, True, False, "mixed_float16", "auto: a GPU"),
    # --precision float32 wins even on a bf16 CPU
    ("float32", {"avx512_bf16"}, False, True, "float32", "as asked"),
])
def test_precision_follows_cpu_flags_and_gpu_unless_asked_and_says_why(requested, flags, gpu,
                                                                       onednn, precision, why):
    """bf16 only where the CPU has native bf16 and TensorFlow's oneDNN kernels run; float16
    on GPUs; float32 otherwise; the user's choice wins. A run's log says why."""
    assert resolve_precision(requested, flags=flags, gpu=gpu, onednn=onednn) == (precision, why)
    assert choose_precision(requested, flags=flags, gpu=gpu, onednn=onednn) == precision


@pytest.mark.parametrize(("reported", "precision"), [(None, "mixed_bfloat16"),
                                                     (False, "float32")])
def test_auto_asks_tensorflow_whether_its_onednn_kernels_run(monkeypatch, reported, precision):
    """Left to the machine, auto asks TensorFlow; where it cannot say (a private call gone in
    a later release), bf16 is kept as the CPU's flags say."""
    import fer.precision

    monkeypatch.setattr(fer.precision, "onednn_enabled", lambda: reported)
    assert choose_precision("auto", flags={"avx512_bf16"}, gpu=False) == precision


@pytest.mark.parametrize(("precision", "flags", "gpu", "onednn", "slow"), [
    ("mixed_bfloat16", {"avx2"}, False, True, "this CPU has no bf16 instructions (amx_bf16, "
                                              "avx512_bf16)"),
    ("mixed_bfloat16", {"avx512_bf16"}, False, True, None),
    ("mixed_bfloat16", {"avx512_bf16"}, False, False,
     "TensorFlow's oneDNN kernels are off here (TF_ENABLE_ONEDNN_OPTS=0)"),
    ("mixed_bfloat16", {"avx2"}, True, True, None),
    ("mixed_float16", {"amx_bf16"}, False, True,
     "this machine has no GPU, and CPUs emulate float16"),
    ("mixed_float16", set(), True, True, None),
    ("float32", set(), False, False, None),
])
def test_a_precision_slow_on_this_machine_is_named(precision, flags, gpu, onednn, slow):
    """A resumed run keeps its precision: where it began on a bf16 CPU or a GPU and resumes
    on a machine without (or with TensorFlow's oneDNN kernels off), it trains several times
    slower, and the log says why."""
    assert slow_here(precision, flags=flags, gpu=gpu, onednn=onednn) == slow


def test_unknown_precision_is_refused_with_the_valid_names():
    with pytest.raises(FerError, match=r"--precision half: expected one of auto, float32"):
        choose_precision("half")


def test_cpu_flags_reads_proc_cpuinfo_format(tmp_path):
    """Flags come from the 'flags' line of /proc/cpuinfo; a missing file gives no flags."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "none") == set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo here")
def test_auto_reads_this_machines_cpu_flags():
    """Left to the machine, auto picks bf16 exactly where this CPU's /proc/cpuinfo names a
    bf16 instruction (the sessions' machines differ: AVX512_BF16 or AVX2 only), read here
    independently of fer's parser."""
    named = set(re.findall(r"\b(avx512_bf16|amx_bf16)\b", Path("/proc/cpuinfo").read_text()))
    precision, why = resolve_precision("auto", gpu=False, onednn=True)
    assert precision == ("mixed_bfloat16" if named else "float32"), why
    assert why == (f"auto: the CPU has {', '.join(sorted(named))}" if named else NO_BF16)


def test_onednn_is_asked_for_unless_the_user_chose():
    """TF_ENABLE_ONEDNN_OPTS=1 by default; a user's 0 (to reproduce an old run) is kept."""
    unset, chosen = {}, {ONEDNN_SWITCH: "0"}
    prefer_onednn(unset)
    prefer_onednn(chosen)
    assert unset == {ONEDNN_SWITCH: "1"} and chosen == {ONEDNN_SWITCH: "0"}
