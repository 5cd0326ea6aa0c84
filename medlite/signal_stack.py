"""A dangling alternate signal stack, found and switched off before a run handles signals.

OpenVINO's CPU plugin gives the thread that compiles a model an alternate signal stack
(``sigaltstack``), and each ``ov.Core`` puts the previous one back when it is destroyed. Destroyed
out of order (two cores, the first deleted first; NNCF makes cores of its own), the thread is
left with a stack whose memory was freed. Python installs its signal handlers with
``SA_ONSTACK``, so the next signal the main thread receives (Ctrl-C, a scheduler's SIGTERM) is
delivered onto unmapped memory and the process dies of SIGSEGV instead of stopping cleanly:
seen after an OpenVINO int8 export, in a later run of the same process. Linux only (reads
``/proc/self/maps``); elsewhere nothing is done.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

_SS_DISABLE = 2


class _StackT(ctypes.Structure):
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]


def _mapped(address: int) -> bool:
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(x, 16) for x in line.split(maxsplit=1)[0].split("-"))
            if start <= address < end:
                return True
    return False


def disable_dangling_altstack() -> bool:
    """Switch off this thread's alternate signal stack if its memory is no longer mapped;
    returns whether it did. Handlers then run on the thread's own stack, as without one."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        current = _StackT()
        if libc.sigaltstack(None, ctypes.byref(current)) != 0:
            return False
        if current.flags & _SS_DISABLE or not current.sp or _mapped(current.sp):
            return False
        off = _StackT(None, _SS_DISABLE, 0)
        if libc.sigaltstack(ctypes.byref(off), None) != 0:
            return False
    except (OSError, AttributeError, ValueError):
        return False
    log.debug("switched off a dangling alternate signal stack at %#x", current.sp)
    return True
