"""Mamba's selective scan (S6) for CPUs (PyTorch and C), dispatching to ``mamba_ssm`` on CUDA.

The recurrence, per batch element b, channel d and state index n::

    h_t = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t
    y_t = sum_n C_t[n] * h_t[n]  (+ D[d] * u_t),   out_t = y_t * silu(z_t)  (when z is given)

:func:`selective_scan` has the signature and semantics of
``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``; :func:`selective_scan_ref` is a
readable loop over time, the reference for tests.

The fast path (``backend="fast"``) is a blocked, chunked linear scan written for CPUs, where a
Python loop over every time step is dominated by per-op overhead and a fully vectorised
parallel scan is dominated by memory traffic (page faults on ~100 MB temporaries). Time is cut
into blocks of a few MB of state; each block is cut into ``k`` chunks of ``chunk_size`` steps:

1. one step of the recurrence advances all ``k`` chunks of the block at once (a loop of
   ``chunk_size`` in-place ``addcmul`` on (k, batch*D*N) slices), each chunk starting from zero
   (the first chunk starts from the state carried in from the previous block);
2. chunk ``j`` then gets ``P_t * h_end(j-1)`` added, with ``P_t`` the decay since the chunk's
   start (a running product of the step decays, kept during step 1) — a loop over the ``k``
   chunks, each op on a whole chunk.

Only ``exp`` of non-positive numbers (``delta * A`` with ``A <= 0``, ``delta >= 0``) and
products of decays in (0, 1] occur, so nothing overflows at any length: long products
underflow to 0, which is their correct value in fp32. Gradients come from a hand-written
backward that recomputes the states block by block (as mamba's kernel does) and runs the
adjoint recurrence backwards in time with the same chunking, so memory stays at the size of
the inputs plus one block, not (batch, D, N, L).

The native path (``backend="native"``, what ``"auto"`` runs on CPU where it can) runs the same
blocked algorithm in C (:mod:`.native`, ``scan_kernel.c``): the forward keeps 16 channels'
states in vector registers for the whole sequence and writes each block's start state; the
backward recomputes a block's states from it and runs the adjoint recurrence, as above. One
pass over the inputs instead of ~7 passes over (batch, D, N, L): 10-35x faster than the
sequential reference where the PyTorch path is 3-9x (``scripts/bench_scan.py``).

The export path (``backend="export"``, chosen automatically while a graph is exported or traced,
see :func:`tracing_for_export`) computes the same scan from standard tensor ops only: the fast
path's block plan is Python arithmetic on the batch size, which a symbolic batch dimension
breaks. Time is cut into about ``sqrt(L)`` chunks of about ``sqrt(L)`` steps (from L alone,
static for a fixed image size); a loop over the steps of a chunk advances all chunks at once
from a zero state, a loop over the chunks carries the state from chunk to chunk, and each step
then gets the state it entered its chunk with, decayed by ``exp`` of a (non-positive) cumulative
sum of log-decays. That is O(L) work in about ``4 sqrt(L)`` graph nodes, and as overflow-free as
the fast path. Gradients come from autograd. Inside :func:`fused_scan_nodes` the legacy ONNX
exporter writes one ``medlite::SelectiveScan`` node per scan instead, for OpenVINO to run with
the C kernel (:mod:`medlite.deploy.openvino_scan`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from medlite import efficiency
from medlite.errors import MedliteError
from medlite.models.ops import native

log = logging.getLogger(__name__)

BACKENDS = ("auto", "native", "fast", "ref", "mamba_ssm", "export")

# Target elements of one block's state tensor (batch * D * N * block_length): ~4 MB of fp32,
# large enough that each op amortises its overhead, small enough to stay in cache.
_BLOCK_ELEMENTS = 1 << 20


class OptionalDependencyError(MedliteError, RuntimeError):
    """An optional extra (here ``medlite[mamba]``) is needed for what was asked."""


class NativeKernelUnavailable(MedliteError, RuntimeError):
    """``backend="native"`` was asked for where the C kernel cannot run."""


@functools.lru_cache(maxsize=1)
def mamba_ssm_available() -> bool:
    """True when ``mamba_ssm`` and its compiled CUDA scan import (checked once, lazily)."""
    try:
        import mamba_ssm.ops.selective_scan_interface  # noqa: F401
    except Exception as exc:  # ImportError, or OSError/RuntimeError from a broken CUDA build
        log.debug("mamba_ssm is not usable: %s", exc)
        return False
    return True


def tracing_for_export(x: torch.Tensor) -> bool:
    """True while a graph is being captured for export, when the ops must avoid their fast paths.

    The fast paths plan their blocks with Python arithmetic on the batch size, which fails on
    (or would bake in) a symbolic batch. Set in torch 2.14: ``torch.compiler.is_exporting()``
    under ``torch.export`` (strict or not) and the dynamo ONNX exporter built on it;
    ``torch.jit.is_tracing()`` under the legacy ONNX exporter and ``torch.jit.trace``;
    ``torch.onnx.is_in_onnx_export()`` under both ONNX exporters; a symbolic dimension of ``x``
    under any symbolic tracing (e.g. ``torch.compile(dynamic=True)``). About 2 us when false.
    """
    return (
        torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or any(isinstance(s, torch.SymInt) for s in x.shape)
    )


@functools.lru_cache(maxsize=1)
def native_kernel() -> native.ScanKernel | None:
    """The C kernel (:mod:`.native`), built on first use and checked once against the
    sequential reference (outputs and gradients); None (with one warning saying why) where it
    cannot be used."""
    kernel = native.load()
    if kernel is None:
        log.info("medlite's C scan kernel is not used: %s", native.status())
        return None
    mismatch = _native_self_check(kernel)
    if mismatch is not None:
        log.warning(
            "medlite's C scan kernel (%s) disagrees with the reference scan (max |diff| %.2g); "
            "using the PyTorch scan instead",
            kernel.path,
            mismatch,
        )
        return None
    return kernel


def native_kernel_for(x: torch.Tensor, n: int) -> native.ScanKernel | None:
    """The C kernel if it can run this call: real CPU tensors, outside torch.compile, N <= 64."""
    if (
        x.device.type != "cpu"
        or type(x) not in (torch.Tensor, torch.nn.Parameter)  # fake / functional tensors
        or not native.supports(n)
        or torch.compiler.is_compiling()
    ):
        return None
    return native_kernel()


def require_native_kernel(x: torch.Tensor, n: int) -> native.ScanKernel:
    kernel = native_kernel_for(x, n)
    if kernel is None:
        why = (
            f"it runs on plain CPU tensors with N <= {native.MAX_STATE} (got {x.device.type}, "
            f"N={n})"
            if native_kernel() is not None
            else native.status()
        )
        raise NativeKernelUnavailable(
            f"selective_scan(backend='native') cannot run here: {why}. Use backend='auto' "
            "(falls back to the PyTorch scan) or 'fast'"
        )
    return kernel


def _native_self_check(kernel: native.ScanKernel) -> float | None:
    """Max |diff| of a small grouped scan's outputs and gradients against the reference if
    above 1e-4, else None."""
    # First use may come from inside no_grad / inference_mode (Lightning's validation).
    with torch.inference_mode(False), torch.enable_grad():
        g = torch.Generator().manual_seed(0)
        batch, dim, n, length = 2, 32, 5, 37
        inputs = [
            torch.randn(batch, dim, length, generator=g),  # u
            torch.randn(batch, dim, length, generator=g),  # delta
            -torch.rand(dim, n, generator=g) * 4,  # A
            torch.randn(batch, 2, n, length, generator=g),  # B, per group
            torch.randn(batch, 2, n, length, generator=g),  # C
        ]
        weight = torch.randn(batch, dim, length, generator=g)

        def run(scan):
            leaves = [t.clone().requires_grad_(True) for t in inputs]
            y, last = scan(*leaves, None, None, None, True, True)
            return [y, last, *torch.autograd.grad((y * weight).sum(), leaves)]

        ref = run(selective_scan_ref)
        out = run(functools.partial(_selective_scan_fast, chunk_size=16, kernel=kernel))
    diff = max((a - b).abs().max().item() for a, b in zip(ref, out, strict=True))
    return diff if not diff <= 1e-4 else None  # NaN counts as a mismatch


@contextlib.contextmanager
def fp32_region(device: torch.device) -> Iterator[None]:
    """Disable autocast for ``device``'s type so the scan runs in the fp32 it is cast to."""
    try:
        ctx = torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        ctx = contextlib.nullcontext()
    with ctx:
        yield


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    backend: str = "auto",
    chunk_size: int = 16,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan with the semantics of ``mamba_ssm``'s ``selective_scan_fn``.

    Args:
        u, delta: (batch, D, L) input and step size.
        A: (D, N) real state matrix (Mamba uses ``A = -exp(A_log)``; the fast path is only
            overflow-free for ``A <= 0`` with ``delta >= 0``, like the recurrence itself).
        B, C: (batch, N, L), (batch, G, N, L) with G groups dividing D (channel d uses group
            ``d // (D // G)``), or (D, N) time-invariant.
        D: (D,) skip connection ``y += D * u``.
        z: (batch, D, L) gate, ``out = y * silu(z)``.
        delta_bias: (D,) added to ``delta`` before the optional softplus.
        delta_softplus: apply ``softplus`` to ``delta`` (after the bias).
        return_last_state: also return the state after the last step, (batch, D, N). On the
            fast and mamba_ssm paths it carries no gradient.
        backend: ``"auto"`` (mamba_ssm's kernel for CUDA tensors when it imports; on CPU
            ``"native"`` where it can run, else ``"fast"``), ``"native"`` (``"fast"``'s
            algorithm with its forward and backward loops in medlite's C kernel, CPU only, see
            :mod:`.native`),
            ``"fast"`` (blocked chunked scan in PyTorch, CPU or GPU), ``"ref"`` (sequential
            loop), ``"mamba_ssm"`` (needs ``pip install "medlite[mamba]"``) or ``"export"``
            (standard tensor ops only, traceable with a dynamic batch). While a graph is
            exported or traced (:func:`tracing_for_export`), ``"auto"``, ``"native"`` and
            ``"fast"`` run ``"export"``.
        chunk_size: time steps per chunk of the fast path (tuning knob; 8-32 is best on CPU).
            The export path picks its own chunking from L.

    Returns:
        (batch, D, L) in ``u``'s dtype, computed in fp32 (autocast disabled inside).
    """
    if backend not in BACKENDS:
        raise ValueError(f"selective_scan backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "mamba_ssm":  # (mamba_ssm checks its own inputs)
        _check_shapes(u, delta, A, B, C, D, z, delta_bias)  # before backend-specific errors
    if backend in ("auto", "native", "fast") and tracing_for_export(u):
        if _FUSED_NODES["on"] and _fusable(D, z, delta_bias, delta_softplus, return_last_state):
            return _ScanNode.apply(u, delta, A, B, C, D, delta_bias)
        backend = "export"
    elif backend == "auto":
        if u.is_cuda and mamba_ssm_available():
            backend = "mamba_ssm"
        else:
            backend = "native" if native_kernel_for(u, A.shape[-1]) else "fast"
    efficiency.note_implementation("selective_scan", backend)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if backend == "mamba_ssm":
        return _selective_scan_mamba(*args)
    if backend == "ref":
        return selective_scan_ref(*args)
    if backend == "export":
        return _selective_scan_export(*args)
    kernel = require_native_kernel(u, A.shape[-1]) if backend == "native" else None
    return _selective_scan_fast(*args, chunk_size=chunk_size, kernel=kernel)


#: set by :func:`fused_scan_nodes` while a graph with one node per scan is exported
_FUSED_NODES = {"on": False}
#: the ONNX node :func:`fused_scan_nodes` emits (a runtime registers its implementation)
FUSED_NODE_DOMAIN, FUSED_NODE_TYPE = "medlite", "SelectiveScan"


@contextlib.contextmanager
def fused_scan_nodes() -> Iterator[None]:
    """While the legacy (TorchScript) ONNX exporter runs inside this block, each selective scan
    becomes one ``medlite::SelectiveScan`` node instead of ~4 sqrt(L) standard ops, for a runtime
    that runs medlite's C kernel there (:mod:`medlite.deploy.openvino_scan`). The node computes
    ``selective_scan(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=True)``: what
    Vim and VMamba call. Other calls (a gate ``z``, no softplus, the last state) stay standard ops.
    """
    before = _FUSED_NODES["on"]
    _FUSED_NODES["on"] = True
    try:
        yield
    finally:
        _FUSED_NODES["on"] = before


def _fusable(D, z, delta_bias, delta_softplus, return_last_state) -> bool:
    required = D is not None and delta_bias is not None and bool(delta_softplus)
    return required and z is None and not return_last_state


class _ScanNode(torch.autograd.Function):
    """Export-only: the scan's value while tracing, one custom node in the ONNX graph."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias):
        return _selective_scan_export(u, delta, A, B, C, D, None, delta_bias, True, False)

    @staticmethod
    def symbolic(g, u, delta, A, B, C, D, delta_bias):
        node = g.op(f"{FUSED_NODE_DOMAIN}::{FUSED_NODE_TYPE}", u, delta, A, B, C, D, delta_bias)
        node.setType(u.type())
        return node


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference selective scan: a plain loop over time (slow; for tests). See
    :func:`selective_scan` for the arguments."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    with fp32_region(u.device):
        u32, delta = u.float(), _discretise(delta, delta_bias, delta_softplus)
        A = A.float()
        batch, dim, length = u32.shape
        B_per_channel = _per_channel(B.float(), dim)  # (batch, D, N, L) or (D, N)
        C_per_channel = _per_channel(C.float(), dim)
        # Per-step slices via unbind (one autograd node each, not one full-size gradient per t).
        steps = zip(
            u32.unbind(-1),
            delta.unbind(-1),
            B_per_channel.unbind(-1) if B_per_channel.dim() == 4 else [B_per_channel] * length,
            C_per_channel.unbind(-1) if C_per_channel.dim() == 4 else [C_per_channel] * length,
            strict=True,
        )
        h = u32.new_zeros(batch, dim, A.shape[1])
        ys = []
        for u_t, delta_t, B_t, C_t in steps:  # u_t, delta_t: (batch, D); B_t, C_t: (.., D, N)
            delta_t = delta_t.unsqueeze(-1)
            h = torch.exp(delta_t * A) * h + delta_t * B_t * u_t.unsqueeze(-1)
            ys.append((h * C_t).sum(-1))
        y = torch.stack(ys, dim=-1) if ys else u32.new_zeros(batch, dim, 0)
        out = _finish(y, u32, D, z).to(u.dtype)
    return (out, h) if return_last_state else out


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, D, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta {tuple(delta.shape)} != u {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (D={dim}, N), got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported (use real A = -exp(A_log))")
    n = A.shape[1]
    for name, m in (("B", B), ("C", C)):
        if m.is_complex():
            raise ValueError(f"selective_scan: complex {name} is not supported")
        if m.dim() == 2:
            ok = tuple(m.shape) == (dim, n)
        elif m.dim() == 3:
            ok = tuple(m.shape) == (batch, n, length)
        elif m.dim() == 4:
            ok = (m.shape[0], m.shape[2], m.shape[3]) == (batch, n, length)
            ok = ok and m.shape[1] > 0 and dim % m.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"selective_scan: {name} must be (D, N), (batch, N, L) or (batch, G, N, L) with G "
                f"dividing D (D={dim}, N={n}, L={length}, batch={batch}), got {tuple(m.shape)}"
            )
    groups_b, groups_c = (m.shape[1] if m.dim() == 4 else 1 for m in (B, C))
    if groups_b != groups_c:  # as in mamba_ssm, which sizes both from B
        raise ValueError(
            f"selective_scan: B and C must have the same number of groups, got {groups_b} and "
            f"{groups_c} (a (D, N) or (batch, N, L) one counts as 1 group)"
        )
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and tuple(v.shape) != (dim,):
            raise ValueError(f"selective_scan: {name} must be ({dim},), got {tuple(v.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z {tuple(z.shape)} != u {tuple(u.shape)}")


def _discretise(delta, delta_bias, delta_softplus, exact: bool = True) -> torch.Tensor:
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta) if exact else _softplus_vectorised(delta)
    return delta


def _softplus_vectorised(x: torch.Tensor) -> torch.Tensor:
    """softplus(x) = relu(x) + log(1 + exp(-|x|)), with relu written as (x + |x|) / 2 so the
    gradient at 0 is 1/2. F.softplus runs a scalar log1p on CPU (~10 ns/element); this is
    vectorised and within 1e-7 of it (and exactly x for x > ~17, like softplus)."""
    a = x.abs()
    return 0.5 * (x + a) + torch.log(1 + torch.exp(-a))


def _finish(y, u32, D, z) -> torch.Tensor:
    if D is not None:
        y = y + u32 * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y


def _per_channel(m: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C as (batch, D, N, L) (a view where possible), or (D, N) when time-invariant."""
    if m.dim() == 2:
        return m
    if m.dim() == 3:
        return m[:, None].expand(-1, dim, -1, -1)
    return m.repeat_interleave(dim // m.shape[1], dim=1)


def _selective_scan_mamba(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    if not mamba_ssm_available():
        raise OptionalDependencyError(
            "selective_scan(backend='mamba_ssm') needs the mamba_ssm CUDA kernels, which are not "
            'importable here; install them with pip install "medlite[mamba]" (needs CUDA), or '
            "use backend='auto' / 'fast' (medlite's own scan)"
        )
    if not u.is_cuda:
        raise OptionalDependencyError(
            "selective_scan(backend='mamba_ssm') runs only on CUDA tensors; got device "
            f"{u.device}. Use backend='auto' or 'fast' on CPU"
        )
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


# --------------------------------------------------------------------------------------------
# Fast path
# --------------------------------------------------------------------------------------------


def _selective_scan_fast(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, *, chunk_size, kernel
):
    """(Shapes are checked by :func:`selective_scan`.)"""
    if chunk_size < 1:
        raise ValueError(f"selective_scan: chunk_size must be >= 1, got {chunk_size}")
    with fp32_region(u.device):
        u32 = u.float()
        delta = _discretise(delta, delta_bias, delta_softplus, exact=False)
        y, last = _scan_time_major(
            delta.permute(2, 0, 1),
            (delta * u32).permute(2, 0, 1),
            A.float(),
            _time_major(B.float()),
            _time_major(C.float()),
            chunk_size,
            kernel,
        )
        out = _finish(y.permute(1, 2, 0), u32, D, z).to(u.dtype)
    return (out, last) if return_last_state else out


def _time_major(m: torch.Tensor) -> torch.Tensor:
    """(batch, N, L) / (batch, G, N, L) -> (L, batch, G, N); (D, N) stays."""
    if m.dim() == 2:
        return m
    if m.dim() == 3:
        m = m[:, None]
    return m.permute(3, 0, 1, 2)


def _scan_time_major(
    dl: torch.Tensor,
    dul: torch.Tensor,
    A: torch.Tensor,
    Bl: torch.Tensor | None,
    Cl: torch.Tensor | None,
    chunk_size: int = 16,
    kernel: native.ScanKernel | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The core scan on time-major fp32 tensors (also used by the WKV op).

    ``dl``: (L, batch, D) step sizes, ``dul``: (L, batch, D) ``delta * u``, ``A``: (D, N);
    ``Bl``/``Cl``: (L, batch, G, N), time-invariant (D, N), or None for a constant 1 (only
    with N == 1: then ``y`` is the state itself). Returns ``y`` (L, batch, D) =
    ``sum_n C h`` and the last state (batch, D, N) (no gradient). With ``kernel`` (the C
    kernel) the forward and backward loops run in C, with the same blocks.
    """
    return _ScanFn.apply(dl, dul, A, Bl, Cl, chunk_size, kernel)


class _Plan:
    """Shapes and chunking of one scan call."""

    def __init__(self, dl: torch.Tensor, A: torch.Tensor, Bl: torch.Tensor, chunk_size: int):
        self.length, self.batch, self.dim = dl.shape
        self.n = A.shape[1]
        self.groups = Bl.shape[2] if Bl is not None and Bl.dim() == 4 else 1
        self.heads = self.dim // self.groups
        self.state = self.batch * self.dim * self.n  # elements of one time step's state
        self.q = max(1, min(chunk_size, self.length))
        self.padded = -(-self.length // self.q) * self.q if self.length else 0
        per_block = max(1, _BLOCK_ELEMENTS // (self.q * max(self.state, 1)))
        self.block = self.q * per_block

    def blocks(self) -> list[tuple[int, int]]:
        return [(t, min(t + self.block, self.padded)) for t in range(0, self.padded, self.block)]


def _pad_time(x: torch.Tensor, padded: int) -> torch.Tensor:
    """Zero-pad dim 0 to ``padded`` (zero delta keeps the state; zero B/C add nothing)."""
    x = x.contiguous()
    if x.shape[0] == padded:
        return x
    return torch.cat([x, x.new_zeros(padded - x.shape[0], *x.shape[1:])])


class _ScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dl, dul, A, Bl, Cl, chunk_size, kernel):
        plan = _Plan(dl, A, Bl, chunk_size)
        dl, dul = _pad_time(dl, plan.padded), _pad_time(dul, plan.padded)
        A = A.contiguous()
        Bl, Cl = _pad_bc(Bl, plan.padded), _pad_bc(Cl, plan.padded)
        if kernel is not None and plan.padded:
            h0 = dl.new_zeros(plan.state)
            y, starts, state = kernel.forward(dl, dul, A, Bl, Cl, h0, every=plan.block)
        else:
            y, starts, state = _forward_blocks(plan, dl, dul, A, Bl, Cl)
        if plan.padded:
            ctx.save_for_backward(dl, dul, A, Bl, Cl, starts)
        ctx.plan, ctx.kernel = plan, kernel
        last = state.view(plan.batch, plan.dim, plan.n)
        ctx.mark_non_differentiable(last)
        return y[: plan.length], last

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, _g_last):
        plan: _Plan = ctx.plan
        if not plan.padded:
            return (None,) * 7
        dl, dul, A, Bl, Cl, starts = ctx.saved_tensors
        gy = _pad_time(gy.float(), plan.padded)
        if ctx.kernel is not None:
            grads = ctx.kernel.backward(dl, dul, A, Bl, Cl, starts, gy, every=plan.block)
        else:
            grads = _backward_blocks(plan, dl, dul, A, Bl, Cl, starts, gy)
        g_dl, g_dul, g_A, g_B, g_C = grads
        length = plan.length
        g_B = g_B[:length] if g_B is not None and g_B.dim() == 4 else g_B
        g_C = g_C[:length] if g_C is not None and g_C.dim() == 4 else g_C
        return g_dl[:length], g_dul[:length], g_A, g_B, g_C, None, None


def _backward_blocks(plan: _Plan, dl, dul, A, Bl, Cl, starts, gy):
    """The PyTorch backward on padded tensors: gradients of dl, dul, A, Bl and Cl."""
    b, d, n, g, hd = plan.batch, plan.dim, plan.n, plan.groups, plan.heads
    g_dl = torch.empty_like(dl)
    g_dul = torch.empty_like(dul)
    g_A = torch.zeros_like(A)
    g_B, g_C = _grad_buffer(Bl), _grad_buffer(Cl)
    size = (min(plan.block, plan.padded), b, d, n)
    a_buf, h_buf, p_buf, lam_buf = (dl.new_empty(size) for _ in range(4))
    carry = dl.new_zeros(plan.state)  # decay(t_next) * lambda(t_next) from the next block
    blocks = plan.blocks()
    for i in range(len(blocks) - 1, -1, -1):
        t0, t1 = blocks[i]
        lb, k, q = t1 - t0, (t1 - t0) // plan.q, plan.q
        a, h, p, lam = a_buf[:lb], h_buf[:lb], p_buf[:lb], lam_buf[:lb]
        dblk = dl[t0:t1]
        start = starts[i]
        _block_states(plan, dblk, dul[t0:t1], A, Bl, t0, start, a, h, p)
        # lambda_t = dL/dh_t = gy_t C_t + a_{t+1} lambda_{t+1}, backwards in time.
        gyb = gy[t0:t1]
        _outer(plan, gyb, _rows(Cl, t0, t1), out=lam)
        a3, lam3, p3 = a.view(k, q, -1), lam.view(k, q, -1), p.view(k, q, -1)
        lam3[k - 1, q - 1].add_(carry)
        a_s, lam_s = a3.unbind(1), lam3.unbind(1)
        if k > 1:  # r_s = prod_{r > s in chunk} a_r, for chunks 0..k-2 (reuses p)
            p3[: k - 1, q - 1].fill_(1.0)
            a_head, r_head = a3[: k - 1].unbind(1), p3[: k - 1].unbind(1)
        for s in range(q - 2, -1, -1):
            lam_s[s].addcmul_(a_s[s + 1], lam_s[s + 1])
            if k > 1:
                torch.mul(r_head[s + 1], a_head[s + 1], out=r_head[s])
        lam_c, r_c, a_c = lam3.unbind(0), p3.unbind(0), a3.unbind(0)
        for j in range(k - 2, -1, -1):
            lam_c[j].addcmul_(r_c[j], a_c[j + 1][0] * lam_c[j + 1][0])
        carry = a3[0, 0] * lam3[0, 0]
        # x_t = du_t B_t: grads of du and B; y_t = C_t . h_t: grad of C. ``p`` is free now
        # and serves as scratch (multiply + sum beats bmm for the reductions over N).
        dub = dul[t0:t1]
        _contract(plan, lam, _rows(Bl, t0, t1), out=g_dul[t0:t1], scratch=p)
        if Bl is not None and Bl.dim() == 4:  # sums over a group's channels: bmm is fastest
            lam_g = lam.view(lb * b * g, hd, n)
            torch.matmul(dub.reshape(lb * b * g, 1, hd), lam_g, out=_row(g_B[t0:t1]))
        elif Bl is not None:
            g_B += torch.mul(lam, dub.unsqueeze(-1), out=p).sum((0, 1))
        if Cl is not None and Cl.dim() == 4:
            h_g = h.view(lb * b * g, hd, n)
            torch.matmul(gyb.reshape(lb * b * g, 1, hd), h_g, out=_row(g_C[t0:t1]))
        elif Cl is not None:
            g_C += torch.mul(h, gyb.unsqueeze(-1), out=p).sum((0, 1))
        # a_t = exp(delta_t A): dL/d(delta_t A) = lambda_t a_t h_{t-1}.
        e = a.mul_(lam).view(lb, -1)
        e[1:].mul_(h.view(lb, -1)[:-1])
        e[0].mul_(start)
        e = e.view(lb, b, d, n)
        torch.sum(torch.mul(e, A, out=p), dim=-1, out=g_dl[t0:t1])
        g_A += torch.mul(e, dblk.unsqueeze(-1), out=p).sum((0, 1))
    return g_dl, g_dul, g_A, g_B, g_C


def _forward_blocks(plan: _Plan, dl, dul, A, Bl, Cl):
    """The PyTorch forward: ``y``, the state before each block, and the last state."""
    y = dl.new_empty(plan.padded, plan.batch, plan.dim)
    state = dl.new_zeros(plan.state)
    starts = []
    a_buf = dl.new_empty(min(plan.block, plan.padded), plan.batch, plan.dim, plan.n)
    h_buf = torch.empty_like(a_buf)
    for t0, t1 in plan.blocks():
        starts.append(state)
        a, h = a_buf[: t1 - t0], h_buf[: t1 - t0]
        _block_states(plan, dl[t0:t1], dul[t0:t1], A, Bl, t0, state, a, h, a)
        state = h.view(t1 - t0, -1)[-1].clone()
        _contract(plan, h, _rows(Cl, t0, t1), out=y[t0:t1], scratch=a)
    return y, torch.stack(starts) if starts else None, state


def _grad_buffer(m: torch.Tensor | None) -> torch.Tensor | None:
    if m is None:
        return None
    return torch.empty_like(m) if m.dim() == 4 else torch.zeros_like(m)


def _pad_bc(m: torch.Tensor | None, padded: int) -> torch.Tensor | None:
    if m is None:
        return None
    return _pad_time(m, padded) if m.dim() == 4 else m.contiguous()


def _rows(m: torch.Tensor | None, t0: int, t1: int) -> torch.Tensor | None:
    return m[t0:t1] if m is not None and m.dim() == 4 else m


def _row(x: torch.Tensor) -> torch.Tensor:
    """(lb, b, g, n) -> (lb*b*g, 1, n) view for matmul out=."""
    return x.view(-1, 1, x.shape[-1])


def _outer(plan: _Plan, s: torch.Tensor, m: torch.Tensor, *, out: torch.Tensor) -> None:
    """out (lb, b, D, N) = s (lb, b, D) outer m ((lb, b, G, N) per group, or (D, N))."""
    lb = s.shape[0]
    if m is None:  # B == 1 with N == 1
        out.copy_(s.unsqueeze(-1))
    elif m.dim() == 4:
        b, g, hd, n = plan.batch, plan.groups, plan.heads, plan.n
        torch.mul(s.view(lb, b, g, hd, 1), m.view(lb, b, g, 1, n), out=out.view(lb, b, g, hd, n))
    else:
        torch.mul(s.unsqueeze(-1), m, out=out)


def _contract(plan: _Plan, h, m, *, out, scratch) -> None:
    """out (lb, b, D) = sum_n h (lb, b, D, N) * m ((lb, b, G, N) per group, or (D, N)).

    A multiply into ``scratch`` then a sum beats a batched mat-vec (bmm) on CPU here."""
    lb = h.shape[0]
    if m is None:  # C == 1 with N == 1
        out.copy_(h.squeeze(-1))
    elif m.dim() == 4:
        b, g, hd, n = plan.batch, plan.groups, plan.heads, plan.n
        prod = torch.mul(
            h.view(lb, b, g, hd, n), m.view(lb, b, g, 1, n), out=scratch.view(lb, b, g, hd, n)
        )
        torch.sum(prod.view(lb, b, -1, n), dim=-1, out=out)
    else:
        torch.sum(torch.mul(h, m, out=scratch), dim=-1, out=out)


def _block_states(plan, dblk, dublk, A, Bl, t0, start, a, h, p) -> None:
    """Fill ``a`` with exp(delta A) and ``h`` with the states of one block (in place).

    ``start`` (batch*D*N,) is the state before the block. ``p`` receives, for chunks 1.., the
    decay since the chunk's start (a running product of ``a``); it may be ``a`` itself, which
    is then overwritten (the forward pass does not need ``a`` afterwards).
    """
    lb = dblk.shape[0]
    q = plan.q
    k = lb // q
    torch.mul(dblk.unsqueeze(-1), A, out=a).exp_()
    _outer(plan, dublk, _rows(Bl, t0, t0 + lb), out=h)
    a3, h3, p3 = a.view(k, q, -1), h.view(k, q, -1), p.view(k, q, -1)
    h3[0, 0].addcmul_(a3[0, 0], start)
    # unbind: all per-step views in one call (per-step indexing is a visible cost on CPU)
    a_s, h_s = a3.unbind(1), h3.unbind(1)
    if k > 1:
        if p is not a:
            p3[1:, 0].copy_(a3[1:, 0])
        a_rest, p_rest = a3[1:].unbind(1), p3[1:].unbind(1)
    for s in range(1, q):  # every chunk of the block advances one step (chunks start at 0)
        h_s[s].addcmul_(a_s[s], h_s[s - 1])
        if k > 1:
            torch.mul(p_rest[s - 1], a_rest[s], out=p_rest[s])
    h_c, p_c = h3.unbind(0), p3.unbind(0)
    for j in range(1, k):  # add the decayed end state of the (already complete) chunk j-1
        h_c[j].addcmul_(p_c[j], h_c[j - 1][q - 1])


# --------------------------------------------------------------------------------------------
# Export path
# --------------------------------------------------------------------------------------------


def export_chunking(length: int) -> tuple[int, int]:
    """(chunk length, number of chunks) of the export paths, about ``sqrt(L)`` each.

    That keeps the scan's two Python loops (over the steps of a chunk, over the chunks), hence
    the graph, at O(sqrt(L)) ops, and balances the WKV's (chunk x chunk) work inside chunks
    against its (chunks x chunks) work between them. The padding (< one chunk) is never a whole
    chunk. Depends on L only, never on the batch size.
    """
    chunk = math.isqrt(length - 1) + 1 if length > 0 else 1
    return chunk, -(-length // chunk)


def _per_channel_export(m: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C broadcastable to (batch, D, N, L) without naming the batch size: (D, N, 1),
    (batch, 1, N, L), or (batch, D, N, L) for G > 1 groups (each repeated D // G times)."""
    if m.dim() == 2:
        return m.unsqueeze(-1)
    if m.dim() == 3:
        return m.unsqueeze(1)
    if m.shape[1] == 1:
        return m
    return m.unsqueeze(2).expand(-1, -1, dim // m.shape[1], -1, -1).flatten(1, 2)


def _to_chunks(x: torch.Tensor, chunk: int, n_chunks: int) -> torch.Tensor:
    """(..., L) -> (..., n_chunks, chunk), zero-padded at the end (a zero log-decay keeps the
    state, a zero input adds nothing); time-invariant (..., 1) -> broadcastable (..., 1, 1)."""
    if x.shape[-1] == 1 and chunk * n_chunks > 1:
        return x.unsqueeze(-1)
    return F.pad(x, (0, chunk * n_chunks - x.shape[-1])).unflatten(-1, (n_chunks, chunk))


def _chunked_scan(
    a: torch.Tensor, x: torch.Tensor, c: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h_t = exp(a_t) h_{t-1} + x_t``, ``y_t = sum_n c_t h_t`` from a zero state, in chunks.

    ``a`` (log-decays <= 0) and ``x``: (batch, D, N, L); ``c`` broadcastable to them. Returns
    ``y`` (batch, D, L) and the last state (batch, D, N). Both Python loops run about
    ``sqrt(L)`` times (see :func:`export_chunking`), so the graph stays small.
    """
    chunk, n_chunks = export_chunking(length)
    a, x, c = (_to_chunks(t, chunk, n_chunks) for t in (a, x, c))  # (b, D, N, K, Q)
    # 1. Every chunk from a zero state, all chunks at once: a loop over the steps of a chunk.
    decays, inputs = torch.exp(a).unbind(-1), x.unbind(-1)
    hs = [inputs[0]]
    for s in range(1, chunk):
        hs.append(decays[s] * hs[-1] + inputs[s])
    h = torch.stack(hs, -1)
    if n_chunks == 1:
        return (h * c).sum(2).flatten(-2)[..., :length], h[..., 0, -1]
    # 2. The state entering each chunk: a loop over the chunks, on their end states.
    chunk_decays, ends = torch.exp(a.sum(-1)).unbind(-1), hs[-1].unbind(-1)
    entering = [ends[0]]  # into chunks 1, 2, ... (chunk 0 starts from zero)
    for k in range(2, n_chunks):
        entering.append(chunk_decays[k - 1] * entering[-1] + ends[k - 1])
    last = chunk_decays[-1] * entering[-1] + ends[-1]
    entering = F.pad(torch.stack(entering, -1), (1, 0))  # (no zeros_like: traced as a constant)
    # 3. Each step gets the entering state, decayed since the chunk's start (a direct sum of
    # log-decays, so exp of a number <= 0).
    h = h + torch.exp(a.cumsum(-1)) * entering.unsqueeze(-1)
    return (h * c).sum(2).flatten(-2)[..., :length], last


def _selective_scan_export(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """The selective scan from standard tensor ops, with no Python arithmetic on the batch size
    (see the module docstring): traceable by torch.export, both ONNX exporters and jit.trace.
    Shapes are checked by :func:`selective_scan`."""
    length = u.shape[-1]
    with fp32_region(u.device):
        u32 = u.float()
        delta = _discretise(delta, delta_bias, delta_softplus, exact=False)
        if length == 0:
            y, last = u32 * 0, u32.new_zeros(u.shape[0], u.shape[1], A.shape[1])
        else:
            dim = u.shape[1]
            a = delta.unsqueeze(2) * A.float().unsqueeze(-1)  # (b, D, N, L), <= 0
            x = (delta * u32).unsqueeze(2) * _per_channel_export(B.float(), dim)
            y, last = _chunked_scan(a, x, _per_channel_export(C.float(), dim), length)
        out = _finish(y, u32, D, z).to(u.dtype)
    return (out, last) if return_last_state else out
