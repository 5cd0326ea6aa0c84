"""Vision-RWKV's bidirectional WKV (Bi-WKV) in plain PyTorch: O(T*C) fast path and O(T^2) reference.

What is computed, per batch element and channel c, for token t of T (0-based)::

    wkv_t = ( sum_{i != t} exp(-(|t-i| - 1) * w + k_i) * v_i  +  exp(u + k_t) * v_t )
            / ( sum_{i != t} exp(-(|t-i| - 1) * w + k_i)       +  exp(u + k_t) )

i.e. a softmax over all tokens with scores ``-(|t-i|-1) w + k_i`` (``u + k_t`` for the token
itself). ``w`` is the decay **per token of distance, exactly as given**: the op does not divide
by T. The Vision-RWKV paper (Duan et al., 2024, Eq. for Bi-WKV) writes the decay as
``(|t-i|-1)/T * w`` with a learned ``w`` (``spatial_decay``) and ``u`` (``spatial_first``), and
its code passes ``spatial_decay / T`` and ``spatial_first / T`` to the CUDA kernel; do the same
here (``wkv_bidirectional(decay / T, first / T, k, v)``) to get the paper's model. ``w`` may be
negative (the paper's init is in [-5, 3] before dividing by T); weights then grow with distance
by at most ``exp(-w * (T-2))``, which is harmless when ``w * T`` is O(1).

The fast path writes both directions as decayed running sums ``S_{t+1} = e^{-w} S_t + e^{k_t}
(v_t, 1)`` (forward over the tokens, and over the reversed tokens) and runs them through the
blocked chunked linear scan of :mod:`.selective_scan`. Each running sum is kept relative to its
own running maximum ``s_t = max_{i<=t}(k_i - (t-i) w)`` (computed with ``cummax``, without
gradient), so every factor is ``exp`` of a non-positive number: no overflow for
any k, w or T. Gradients flow through the scan's hand-written backward.

The export path (``backend="export"``, chosen automatically while a graph is exported or traced)
avoids the scan's batch-size arithmetic and ``cummax`` (which ONNX lacks): tokens are cut into
about ``sqrt(T)`` chunks of about ``sqrt(T)``; inside a chunk the exact softmax form above is
used, and each chunk is summarised (as seen from its end, for later tokens, and from its start,
for earlier ones) by a log-scale and sums relative to it. A (chunks x chunks) step combines the
summaries of all earlier / later chunks, again relative to their maximum, so every ``exp`` is
of a number <= 0 and each token's denominator is >= 1: no overflow for any k, w or T, with a
fixed number of ops and O(batch * T * sqrt(T) * C) time and memory.

Note: upstream's CUDA kernel (OpenGVLab/Vision-RWKV ``wkv_cuda.cu``) appears to apply distance
``|t-i|`` instead of ``|t-i|-1`` to some token pairs; weights trained with it transfer with a
tiny shift of the decay only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medlite import efficiency
from medlite.models.ops.selective_scan import (
    _scan_time_major,
    export_chunking,
    fp32_region,
    native_kernel_for,
    require_native_kernel,
    tracing_for_export,
)

BACKENDS = ("auto", "native", "fast", "ref", "export")

# Elements of the (batch, rows, T, C) score tensor per step of the reference.
_REF_BLOCK_ELEMENTS = 1 << 22


def wkv_bidirectional(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str = "auto",
    chunk_size: int = 16,
) -> torch.Tensor:
    """Bidirectional WKV of Vision-RWKV (see the module docstring for the exact formula).

    Args:
        w: (C,) decay per token of distance (pass ``spatial_decay / T`` for the paper's model).
        u: (C,) bonus of the token itself (``spatial_first / T`` in Vision-RWKV's code).
        k, v: (batch, T, C) keys and values.
        backend: ``"auto"`` (``"native"`` where the C kernel runs, else ``"fast"``),
            ``"native"`` (the O(T*C) scan with its loops in medlite's C kernel, CPU only, see
            :mod:`.native`), ``"fast"`` (the O(T*C) scan in PyTorch), ``"ref"`` (O(T^2)
            softmax form) or ``"export"`` (chunked, standard tensor ops only, traceable with a
            dynamic batch; what auto, native and fast run while a graph is exported or traced).
            There is no CUDA kernel to dispatch to; the fast path runs on CPU and GPU.
        chunk_size: time steps per chunk of the scan (tuning knob; not used by ``"export"``).

    Returns:
        (batch, T, C) in ``k``'s dtype, computed in fp32 (autocast disabled inside).
    """
    if backend not in BACKENDS:
        raise ValueError(f"wkv_bidirectional backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "ref":
        efficiency.note_implementation("wkv", "ref")
        return wkv_bidirectional_ref(w, u, k, v)
    if backend == "export" or tracing_for_export(k):
        efficiency.note_implementation("wkv", "export")
        return _wkv_export(w, u, k, v)
    _check(w, u, k, v)
    kernel = None
    if backend == "native":
        kernel = require_native_kernel(k, 1)
    elif backend == "auto":
        kernel = native_kernel_for(k, 1)
    efficiency.note_implementation("wkv", "fast" if kernel is None else "native")
    batch, length, channels = k.shape
    if length == 0:
        return k.new_zeros(k.shape)
    with fp32_region(k.device):
        w32, u32 = w.float(), u.float()
        k32, v32 = k.float().transpose(0, 1), v.float().transpose(0, 1)  # (T, b, C)
        # Batch the two directions: columns [0, b) read the tokens forwards (sums over i < t),
        # columns [b, 2b) read them reversed (sums over i > t once flipped back).
        kk = torch.cat([k32, k32.flip(0)], dim=1)  # (T, 2b, C)
        vv = torch.cat([v32, v32.flip(0)], dim=1)
        with torch.no_grad():
            # s_t = max_{i <= t} (k_i - (t - i) w): the log-scale of the running sum after t.
            # Only a stabiliser: any rounding is harmless because the decays below are built
            # from these same fp32 values, so the scales telescope exactly.
            pos = torch.arange(length, device=k.device, dtype=torch.float32)[:, None, None]
            wd = w32.detach()
            s = (kk.detach() + pos * wd).cummax(dim=0).values - pos * wd
            ds = torch.zeros_like(s)
            torch.sub(s[1:], s[:-1], out=ds[1:])
        # Running sum kept as S_t * exp(-s_t): decay exp(-(s_t - s_{t-1} + w)) <= 1, input
        # exp(k_t - s_t) <= 1. Step 0 has nothing to decay (its delta only multiplies zero).
        not_first = torch.ones(length, 1, 1, device=k.device)
        not_first[0] = 0.0
        delta = ds + not_first * w32
        e = torch.exp(kk - s)
        dl = torch.cat([delta, delta], dim=-1)  # (T, 2b, 2C): numerator | denominator
        dul = torch.cat([e * vv, e], dim=-1)
        minus_one = torch.full((2 * channels, 1), -1.0, device=k.device)
        h, _ = _scan_time_major(dl, dul, minus_one, None, None, chunk_size, kernel)  # inclusive
        # Exclusive sums for token t: the state after token t-1 (none before token 0).
        hx = torch.cat([h.new_zeros(1, 2 * batch, 2 * channels), h[:-1]])
        sx = torch.cat([s.new_full((1, 2 * batch, channels), float("-inf")), s[:-1]])
        num_p, den_p, s_p = hx[:, :batch, :channels], hx[:, :batch, channels:], sx[:, :batch]
        num_f = hx[:, batch:, :channels].flip(0)
        den_f = hx[:, batch:, channels:].flip(0)
        s_f = sx[:, batch:].flip(0)
        own = u32 + k32
        top = torch.maximum(torch.maximum(s_p, s_f), own.detach())
        e_p, e_f, e_own = torch.exp(s_p - top), torch.exp(s_f - top), torch.exp(own - top)
        num = e_p * num_p + e_f * num_f + e_own * v32
        den = e_p * den_p + e_f * den_f + e_own  # >= ~1: the largest term is exp(0) * (>= 1)
        return (num / den).transpose(0, 1).to(k.dtype)


def wkv_bidirectional_ref(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Reference Bi-WKV: for each token, a softmax over all tokens of the scores
    ``-(|t-i|-1) w + k_i`` (``u + k_t`` at ``i = t``) weighting ``v`` (O(T^2 C), in row blocks)."""
    _check(w, u, k, v)
    batch, length, channels = k.shape
    with fp32_region(k.device):
        w32, u32, k32, v32 = w.float(), u.float(), k.float(), v.float()
        idx = torch.arange(length, device=k.device)
        dist = (idx[:, None] - idx[None, :]).abs()  # (T, T)
        rows = max(1, _REF_BLOCK_ELEMENTS // max(1, batch * length * channels))
        out = []
        for t0 in range(0, length, rows):
            d = dist[t0 : t0 + rows, :, None]  # (r, T, 1)
            scores = -(d - 1) * w32 + k32[:, None]  # (b, r, T, C)
            scores = torch.where(d == 0, u32 + k32[:, None], scores)
            weights = torch.softmax(scores, dim=2)
            out.append((weights * v32[:, None]).sum(2))  # (b, r, C)
        y = torch.cat(out, dim=1) if out else k32.new_zeros(batch, 0, channels)
        return y.to(k.dtype)


def _wkv_export(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bi-WKV from standard tensor ops, chunked (see the module docstring); no cummax and no
    Python arithmetic on the batch size. All log-scales (maxima) carry no gradient: the result
    does not depend on them."""
    _check(w, u, k, v)
    length = k.shape[1]
    if length == 0:
        return k * 0
    chunk, n_chunks = export_chunking(length)
    dev, ninf = k.device, float("-inf")
    with fp32_region(dev):
        w32, u32 = w.float(), u.float()
        pad = (0, 0, 0, chunk * n_chunks - length)
        kc = F.pad(k.float(), pad).unflatten(1, (n_chunks, chunk))  # (b, K, Q, C)
        vc = F.pad(v.float(), pad).unflatten(1, (n_chunks, chunk))
        steps = torch.arange(chunk, device=dev)
        pos = steps.float()[:, None]  # (Q, 1): position in the chunk
        real = (torch.arange(n_chunks * chunk, device=dev) < length).view(n_chunks, chunk)
        # Inside a chunk: score [.., p, i, :] of token i for token p, the exact softmax form.
        own = steps[:, None] == steps[None, :]
        dist = (steps[:, None] - steps[None, :]).abs().float()[..., None]  # (Q, Q, 1)
        bias = torch.where(own[..., None], u32, (1 - dist) * w32)  # (Q, Q, C)
        keep = (real[:, None, :] | own)[..., None]  # padding is no source (but its own target)
        scores = torch.where(keep, kc.unsqueeze(2) + bias, ninf)  # (b, K, Q, Q, C)
        # Each chunk summarised for the tokens after it (seen from its last token) and before it
        # (seen from its first token).
        src = torch.where(real[..., None], kc, ninf)
        fwd = _summarise(src - (chunk - 1 - pos) * w32, vc)
        bwd = _summarise(src - pos * w32, vc)
        # Carried into chunk c: all chunks j < c (forward) / j > c (backward), (c-1-j)*Q and
        # (j-c-1)*Q tokens away from the chunk's edge.
        idx = torch.arange(n_chunks, device=dev)
        gap = ((idx[:, None] - idx[None, :]).abs() - 1).float() * chunk
        lead_f, num_f, den_f = _combine(*fwd, idx[:, None] > idx[None, :], gap, w32)
        lead_b, num_b, den_b = _combine(*bwd, idx[:, None] < idx[None, :], gap, w32)
        # Log-scale of the carried sums at each token: decay from the chunk's edge to the token.
        lead_f = lead_f.unsqueeze(2) - pos * w32  # (b, K, Q, C)
        lead_b = lead_b.unsqueeze(2) - (chunk - 1 - pos) * w32
        top = torch.maximum(scores.amax(3), torch.maximum(lead_f, lead_b)).detach()
        e = torch.exp(scores - top.unsqueeze(3))
        e_f, e_b = torch.exp(lead_f - top), torch.exp(lead_b - top)  # 0 where nothing carried
        num = (e * vc.unsqueeze(2)).sum(3) + e_f * num_f.unsqueeze(2) + e_b * num_b.unsqueeze(2)
        den = e.sum(3) + e_f * den_f.unsqueeze(2) + e_b * den_b.unsqueeze(2)  # >= 1
        return (num / den).flatten(1, 2)[:, :length].to(k.dtype)


def _summarise(scores: torch.Tensor, v: torch.Tensor):
    """Per chunk: the max score m (no gradient) and sum exp(score - m) * (v, 1), over dim 2."""
    m = scores.amax(2).detach()  # finite: no chunk is all padding
    e = torch.exp(scores - m.unsqueeze(2))
    return m, (e * v).sum(2), e.sum(2)


def _combine(m, num, den, mask, gap, w):
    """Sums over the chunks j that ``mask[c, j]`` selects, each decayed by ``gap[c, j] * w``:
    the log-scale (-inf where none; no gradient) and the numerator and denominator relative to
    it, each (b, K, C)."""
    scores = torch.where(mask[..., None], m.unsqueeze(1) - gap[..., None] * w, float("-inf"))
    lead = scores.amax(2).detach()  # (b, K, C)
    safe = torch.where(mask.any(1)[:, None], lead, 0.0)  # no -inf - -inf for the empty rows
    e = torch.exp(scores - safe.unsqueeze(2))
    return lead, (e * num.unsqueeze(1)).sum(2), (e * den.unsqueeze(1)).sum(2)


def _check(w, u, k, v) -> None:
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(
            f"wkv: k and v must both be (batch, T, C), got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    channels = k.shape[-1]
    for name, p in (("w", w), ("u", u)):
        if tuple(p.shape) != (channels,):
            raise ValueError(f"wkv: {name} must be (C={channels},), got {tuple(p.shape)}")
