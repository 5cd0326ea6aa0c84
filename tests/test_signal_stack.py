"""A freed alternate signal stack (what OpenVINO's cores can leave behind) turns the next signal
into a SIGSEGV; medlite switches it off before a run handles signals."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sigaltstack, /proc")

# A child that gives its main thread an alternate signal stack, frees the memory, optionally
# lets medlite repair it, then receives a signal handled by Python (SA_ONSTACK).
CHILD = textwrap.dedent(
    """
    import ctypes, mmap, os, signal, sys
    from medlite.signal_stack import _StackT, disable_dangling_altstack
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = 1 << 16
    mem = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE,
                    mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert libc.sigaltstack(ctypes.byref(_StackT(mem, 0, size)), None) == 0
    print("healthy stack left alone:", disable_dangling_altstack(), flush=True)
    libc.munmap(mem, size)  # the owner frees it, the thread still points at it
    if sys.argv[1] == "repair":
        print("repaired:", disable_dangling_altstack(), flush=True)
    signal.signal(signal.SIGUSR1, lambda *a: print("handled", flush=True))
    os.kill(os.getpid(), signal.SIGUSR1)
    print("alive", flush=True)
    """
)


@linux
def test_a_freed_alternate_stack_is_switched_off_and_signals_are_handled():
    run = lambda mode: subprocess.run(  # noqa: E731
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=60
    )
    broken = run("leave")  # the hazard itself: the signal kills the process
    assert broken.returncode == -signal.SIGSEGV, broken.stdout + broken.stderr
    repaired = run("repair")
    assert repaired.returncode == 0, repaired.stderr
    assert repaired.stdout.split("\n")[:4] == [
        "healthy stack left alone: False",
        "repaired: True",
        "handled",
        "alive",
    ]
