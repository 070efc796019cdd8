"""Runtime: precision choice, the one autocast/GradScaler, the allocator setting and its undoing,
process-wide settings restored, and the torch.compile fallback."""

import ctypes
import os
import platform
import signal

import pytest
import torch
from torch import nn

import training.runtime as runtime
from training.config import TrainConfig
from training.cpu import PrecisionChoice
from training.runtime import (Runtime, autocast_context, cpu_memory_is_kept, graceful_interrupts, keep_freed_cpu_memory,
                              make_grad_scaler, release_freed_cpu_memory, restored_process_settings, select_amp,
                              stop_requested, wrap_model)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
BF16, FP16 = torch.bfloat16, torch.float16
GLIBC = platform.libc_ver()[0] == "glibc"


@pytest.mark.parametrize("native_bf16", [True, False])
@pytest.mark.parametrize("amp", ["auto", "bf16", "fp16", "off"])
def test_select_amp_on_cpu(amp, native_bf16, monkeypatch, capsys):
    monkeypatch.setattr("training.cpu.cpu_has_bf16", lambda: native_bf16)
    # on CPU 'auto' is measured (training/cpu.py): here bf16 is measured faster whenever it is a candidate
    monkeypatch.setattr(runtime, "choose_cpu_precision",
                        lambda *args, candidates: PrecisionChoice(candidates[-1], True, "train", "measured"))
    expected = {"auto": BF16 if native_bf16 else None, "bf16": BF16, "fp16": None, "off": None}
    assert select_amp(CPU, amp) == expected[amp]
    # forcing bf16 where it is emulated is allowed, with one line that says what it costs
    assert ("no native bf16" in capsys.readouterr().err) == (amp == "bf16" and not native_bf16)


@pytest.mark.parametrize("bf16_supported", [True, False])
@pytest.mark.parametrize("amp", ["auto", "bf16", "fp16", "off"])
def test_select_amp_on_cuda(amp, bf16_supported, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    expected = {"auto": BF16 if bf16_supported else FP16, "bf16": BF16, "fp16": FP16, "off": None}
    assert select_amp(CUDA, amp) == expected[amp]


def test_autocast_context_and_grad_scaler():
    a, b = torch.rand(3, 5), torch.rand(5, 2)
    with autocast_context(CPU, BF16):
        assert (a @ b).dtype == BF16
    with autocast_context(CPU, None):
        assert (a @ b).dtype == torch.float32
    with Runtime(CPU, BF16).autocast():
        assert (a @ b).dtype == BF16
    assert make_grad_scaler(CPU, FP16).is_enabled()
    assert not make_grad_scaler(CPU, BF16).is_enabled() and not make_grad_scaler(CPU, None).is_enabled()


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def mmapped_blocks_for_one_large_malloc(libc) -> int:
    """How many mmapped blocks a 64 MB malloc adds (glibc mmaps blocks over 32 MB by default)."""
    before = libc.mallinfo2().hblks
    pointer = libc.malloc(64 << 20)
    assert pointer
    added = libc.mallinfo2().hblks - before
    libc.free(pointer)
    return added


@pytest.mark.skipif(not GLIBC, reason="the allocator setting is glibc's mallopt")
def test_keeping_freed_memory_serves_large_blocks_from_the_heap_and_is_undone():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    was_kept = cpu_memory_is_kept()
    release_freed_cpu_memory()
    try:
        assert mmapped_blocks_for_one_large_malloc(libc) == 1
        assert keep_freed_cpu_memory() is True and cpu_memory_is_kept()
        assert mmapped_blocks_for_one_large_malloc(libc) == 0  # from the heap, kept for reuse
        assert release_freed_cpu_memory() is True and not cpu_memory_is_kept()
        assert mmapped_blocks_for_one_large_malloc(libc) == 1
    finally:
        if was_kept:
            keep_freed_cpu_memory()


def test_process_settings_are_restored_on_exit():
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
              torch.backends.cuda.matmul.allow_tf32, torch.are_deterministic_algorithms_enabled(),
              torch.get_num_threads(), cpu_memory_is_kept())
    with pytest.raises(RuntimeError):  # restored on an error too
        with restored_process_settings():
            torch.backends.cudnn.benchmark = not before[0]
            torch.backends.cudnn.allow_tf32 = not before[1]
            torch.backends.cuda.matmul.allow_tf32 = not before[2]
            torch.use_deterministic_algorithms(not before[3], warn_only=True)
            torch.set_num_threads(1 if before[4] > 1 else 2)
            keep_freed_cpu_memory()
            raise RuntimeError("stop")
    after = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32, torch.are_deterministic_algorithms_enabled(),
             torch.get_num_threads(), cpu_memory_is_kept())
    assert after == before


class FailsAtFirstCall(nn.Module):
    """What torch.compile returns on a machine that cannot compile: fine until the first forward."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *args):
        self.calls += 1
        raise RuntimeError("InductorError: no working C compiler")


def test_compile_failure_at_the_first_forward_falls_back_to_eager(monkeypatch, capsys):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: compiled.append(FailsAtFirstCall(model))
                        or compiled[-1])
    model = nn.Conv2d(1, 2, 3)
    wrapped = wrap_model(model, TrainConfig(compile=True), Runtime(CPU, None))
    image = torch.rand(2, 1, 5, 7)
    assert torch.equal(wrapped(image), model(image)) and torch.equal(wrapped(image), model(image))
    assert compiled[0].calls == 1  # tried once, then eager for good
    assert "torch.compile failed (RuntimeError: InductorError" in capsys.readouterr().out
    assert wrap_model(model, TrainConfig(compile=False), Runtime(CPU, None)) is model


def test_sigterm_is_noted_then_a_second_one_interrupts():
    previous = signal.getsignal(signal.SIGTERM)
    with graceful_interrupts():
        assert not stop_requested()
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before kill returns (same thread)
        assert stop_requested()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    assert not stop_requested() and signal.getsignal(signal.SIGTERM) is previous
