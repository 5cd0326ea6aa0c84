"""medlite's C selective-scan kernel (``scan_kernel.c``, forward and backward): compiled on this
machine at first use.

Why compile at run time rather than ship a binary: the kernel is ~250 lines of plain C that any
C compiler builds in a few seconds, ``-march=native`` then uses the machine's widest vectors
(AVX-512 where there is one), and the install stays pure Python. Nothing links against Python
or torch, so it is loaded with :mod:`ctypes`, and its OpenMP threads are torch's own (the
``libgomp`` torch ships is already loaded when the kernel is).

The library is cached in ``$MEDLITE_CACHE_DIR/kernels`` under a key made of the source, the
compiler, the flags and the CPU, so a cache shared by different machines (an NFS home on a
cluster) never hands one CPU code built for another. Where no compiler works (e.g. Windows
without one), :func:`load` returns None and says why in :func:`status`; the scan then runs its
PyTorch path, 2-5x slower. ``MEDLITE_NATIVE=0`` switches the kernel off.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

import torch

from medlite.cache import cache_dir

log = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("scan_kernel.c")
ENV_SWITCH = "MEDLITE_NATIVE"
MAX_STATE = 64  # MAX_N in scan_kernel.c
LANES = (16, 8, 4, 1)  # the vector widths scan_kernel.c is built for
# Flag sets tried in turn: the best first, then without OpenMP (e.g. Apple clang), then plain.
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-march=native"),
    ("-O3",),
)
_COMPILE_TIMEOUT_S = 120

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@dataclass(frozen=True)
class _Shape:
    """Sizes of one call, and the vector width that keeps each work item in one group."""

    length: int
    batch: int
    dim: int
    n: int
    groups: int
    lanes: int

    @classmethod
    def of(cls, dl: torch.Tensor, A: torch.Tensor, Bl: torch.Tensor | None) -> _Shape:
        length, batch, dim = dl.shape
        groups = Bl.shape[2] if Bl is not None and Bl.dim() == 4 else 1
        return cls(length, batch, dim, A.shape[1], groups, pick_lanes(dim // groups))


@dataclass(frozen=True)
class ScanKernel:
    """The loaded library, with how it was built."""

    path: pathlib.Path
    compiler: str
    flags: tuple[str, ...]
    library: ctypes.CDLL

    def forward(
        self,
        dl: torch.Tensor,
        dul: torch.Tensor,
        A: torch.Tensor,
        Bl: torch.Tensor | None,
        Cl: torch.Tensor | None,
        h0: torch.Tensor,
        every: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the scan on contiguous fp32 CPU tensors in the layout of ``scan_kernel.c``.

        Returns ``y`` (L, batch, D), the states before steps 0, every, 2 every, ...
        (n, batch*D*N), and the last state (batch*D*N,).
        """
        shape = _Shape.of(dl, A, Bl)
        state = shape.batch * shape.dim * shape.n
        y = dl.new_empty(shape.length, shape.batch, shape.dim)
        n_starts = -(-shape.length // every) if every > 0 else 0
        starts, last = dl.new_empty(max(n_starts, 1), state), dl.new_empty(state)
        tensors = (dl, dul, A, Bl, Cl, h0, y, starts, last)
        self._run(self.library.medlite_scan_forward, shape, tensors, (Bl, Cl), every)
        return y, starts[:n_starts], last

    def backward(
        self,
        dl: torch.Tensor,
        dul: torch.Tensor,
        A: torch.Tensor,
        Bl: torch.Tensor | None,
        Cl: torch.Tensor | None,
        starts: torch.Tensor,
        gy: torch.Tensor,
        every: int,
    ) -> tuple[torch.Tensor, ...]:
        """Gradients of the scan from the forward pass's block starts and ``gy`` (L, batch, D).

        Returns the gradients of ``dl``, ``dul``, ``A``, ``Bl`` and ``Cl`` (None for an absent
        B/C), shaped like them.
        """
        shape = _Shape.of(dl, A, Bl)
        per_group = shape.dim // shape.groups // shape.lanes
        per_channel = (shape.batch, shape.dim, shape.n)  # summed over the batch below

        def grad_buffer(m):
            if m is None:
                return None
            if m.dim() == 2:
                return dl.new_empty(per_channel)
            # one slice per work item of a group, summed over them below
            return dl.new_empty(shape.length, shape.batch, shape.groups, per_group, shape.n)

        g_dl, g_dul, g_A = torch.empty_like(dl), torch.empty_like(dul), dl.new_empty(per_channel)
        g_B, g_C = grad_buffer(Bl), grad_buffer(Cl)
        tensors = (dl, dul, A, Bl, Cl, starts, gy, g_dl, g_dul, g_A, g_B, g_C)
        self._run(self.library.medlite_scan_backward, shape, tensors, (Bl, Cl), every)

        def reduce(g):
            if g is None:
                return None
            return g.sum(0) if g.dim() == 3 else g.sum(3)

        return g_dl, g_dul, g_A.sum(0), reduce(g_B), reduce(g_C)

    @staticmethod
    def _run(entry, shape: _Shape, tensors, bc, every: int) -> None:
        for t in tensors:
            if t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or t.is_cuda):
                raise ValueError("native scan: inputs must be contiguous fp32 CPU tensors")
        work_items = shape.batch * (shape.dim // shape.lanes)
        rc = entry(
            *[0 if t is None else t.data_ptr() for t in tensors],
            shape.length, shape.batch, shape.dim, shape.n, shape.groups,
            *(_mode(m) for m in bc),
            every, shape.lanes, max(1, min(torch.get_num_threads(), work_items)),
        )  # fmt: skip
        if rc == -2:
            raise MemoryError("native scan: out of memory for a block of states")
        if rc != 0:
            raise ValueError(f"native scan: shapes not supported ({shape})")

    def exp(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel's own ``exp`` (for testing its accuracy)."""
        x = x.float().contiguous()
        out = torch.empty_like(x)
        self.library.medlite_exp(x.data_ptr(), out.data_ptr(), x.numel())
        return out


def _mode(m: torch.Tensor | None) -> int:
    """scan_kernel.c's B/C modes: 0 per time step and group, 1 time-invariant (D, N), 2 absent."""
    if m is None:
        return 2
    return 1 if m.dim() == 2 else 0


def pick_lanes(heads: int) -> int:
    """The widest vector of channels that stays inside one group of ``heads`` channels."""
    return next(w for w in LANES if heads % w == 0)


def supports(n: int) -> bool:
    return 1 <= n <= MAX_STATE


@functools.lru_cache(maxsize=1)
def _load_once() -> tuple[ScanKernel | None, str]:
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None, f"switched off by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
    compiler = os.environ.get("CC") or next(
        (c for c in ("cc", "gcc", "clang") if shutil.which(c)), None
    )
    if compiler is None or not shutil.which(compiler):
        return None, "no C compiler found (set CC, or install gcc or clang)"
    errors = []
    for flags in FLAG_SETS:
        try:
            path = _build(compiler, flags)
            library = ctypes.CDLL(str(path))
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{compiler} {' '.join(flags)}: {_first_line(exc)}")
            continue
        library.medlite_scan_forward.argtypes = [_P] * 9 + [_I64] * 5 + [_INT, _INT, _I64]
        library.medlite_scan_forward.argtypes += [_INT, _INT]
        library.medlite_scan_forward.restype = _INT
        library.medlite_scan_backward.argtypes = [_P] * 12 + [_I64] * 5 + [_INT, _INT, _I64]
        library.medlite_scan_backward.argtypes += [_INT, _INT]
        library.medlite_scan_backward.restype = _INT
        library.medlite_exp.argtypes = [_P, _P, _I64]
        library.medlite_exp.restype = None
        kernel = ScanKernel(path, compiler, flags, library)
        return kernel, f"compiled with {compiler} {' '.join(flags)} ({path})"
    return None, "the C kernel did not compile: " + "; ".join(errors)


def load() -> ScanKernel | None:
    """The compiled kernel, building it on first use; None where it cannot be built."""
    return _load_once()[0]


def status() -> str:
    """How the kernel was built, or why it is not used (one line, for logs and benchmarks)."""
    return _load_once()[1]


def _first_line(exc: BaseException) -> str:
    text = getattr(exc, "stderr", None) or str(exc)
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [line for line in str(text).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU model and feature flags where Linux tells them."""
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        info = ""
    keep = [
        line
        for line in info.splitlines()
        if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")
    ]
    return "\n".join(sorted(set(keep))) or f"{platform.machine()} {platform.processor()}"


def _build(compiler: str, flags: tuple[str, ...]) -> pathlib.Path:
    """Compile (or reuse) the library for these flags; raises on a failed build."""
    source = SOURCE.read_bytes()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    key = hashlib.sha256(
        b"\0".join(
            s.encode() if isinstance(s, str) else s
            for s in (source, compiler, version, " ".join(flags), _cpu_identity())
        )
    ).hexdigest()[:20]
    name = f"scan_{key}.so"
    folder = cache_dir() / "kernels"
    if (folder / name).exists():
        return folder / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"scan_{key}", suffix=".so.part", dir=folder)
    except OSError:  # a read-only cache: build for this process only
        folder = pathlib.Path(tempfile.mkdtemp(prefix="medlite-kernels-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        fd, tmp = tempfile.mkstemp(prefix=f"scan_{key}", suffix=".so.part", dir=folder)
    os.close(fd)
    target = folder / name
    start = time.perf_counter()
    try:
        subprocess.run(
            [compiler, *flags, "-shared", "-fPIC", "-o", tmp, str(SOURCE)],
            capture_output=True,
            text=True,
            timeout=_COMPILE_TIMEOUT_S,
            check=True,
        )
        os.replace(tmp, target)  # atomic: parallel jobs may build it at the same time
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info(
        "compiled medlite's CPU scan kernel in %.1f s: %s", time.perf_counter() - start, target
    )
    return target
