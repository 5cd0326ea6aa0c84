"""Low-rank factorisation: replace big dense layers by chains of thinner ones.

A weight that is close to low rank wastes parameters and multiply-accumulates. This step
rewrites, in place:

* ``nn.Linear`` (and, with ``pointwise``, 1x1 ``nn.Conv2d``) ``W ~ U V`` by truncated SVD:
  ``in -> r`` (no bias) then ``r -> out`` (the original bias);
* k x k ``nn.Conv2d`` (k > 1, groups 1) by Tucker-2 over the channel modes (tensorly
  ``partial_tucker``): 1x1 ``Cin -> r_in``, k x k ``r_in -> r_out`` (the original stride, padding,
  dilation), 1x1 ``r_out -> Cout`` (the original bias); or, with ``conv: cp``, by a rank-R CP
  decomposition (tensorly ``parafac``): 1x1 ``Cin -> R``, depthwise k x 1, depthwise 1 x k,
  1x1 ``R -> Cout``.

A layer is replaced only when the factorisation has fewer parameters *and* fewer MACs than the
layer (a stride-2 conv's first 1x1 runs at the input resolution, so the two can disagree);
otherwise it is left alone and reported as skipped. The fine-tuning the pipeline runs afterwards
(``epochs``) recovers most of the accuracy the truncation costs.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from medlite.compress.base import CompressionStep, RunContext
from medlite.compress.registry import register_step
from medlite.efficiency import count_macs, count_parameters
from medlite.errors import ConfigError

log = logging.getLogger(__name__)

CONV_METHODS = ("tucker", "cp", "none")
#: layers whose CP decomposition would need a larger Khatri-Rao product are skipped (64 MiB in
#: float64: up to 128 -> 128 channels at rank 64 for 3x3 kernels)
CP_MAX_KHATRI_RAO = 2**23


# ------------------------------------------------------------------------------------------------
# Rank selection


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r whose top-r singular values keep ``energy`` of the squared spectrum (sum s^2)."""
    sq = singular_values.detach().double().flatten().pow(2)
    total = float(sq.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(sq, 0) / total
    # a tiny tolerance, so that energy=1.0 (or a spectrum hitting the threshold exactly) is not
    # pushed one rank higher by rounding in the cumulative sum
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1


def _ratio_rank(full: int, ratio: float) -> int:
    return max(1, min(full, round(ratio * full)))


def _svals(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values, largest first, from the eigenvalues of the smaller Gram matrix (several
    times faster than an SVD of a wide conv unfolding such as 512 x 4608)."""
    m = matrix.detach().double()
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()


def _gram_svd(matrix: torch.Tensor, n_eigenvecs: int | None = None, **_) -> tuple:
    """An ``svd`` callable for tensorly: leading singular triplets via ``eigh`` of the Gram matrix
    of the shorter side (tensorly's default full SVD dominates Tucker's run time)."""
    k = n_eigenvecs or min(matrix.shape)
    if matrix.shape[0] > matrix.shape[1]:
        u, s, vh = _gram_svd(matrix.T, k)
        return vh.T, s, u.T
    evals, evecs = torch.linalg.eigh(matrix @ matrix.T)
    u = evecs.flip(1)[:, :k]
    s = evals.flip(0)[:k].clamp_min(0).sqrt()
    vh = (u.T @ matrix) / s.clamp_min(torch.finfo(s.dtype).tiny)[:, None]
    return u, s, vh


# ------------------------------------------------------------------------------------------------
# Factorised layers: plain nn.Sequential subclasses with named parts (readable state_dict keys,
# and quantisation / ONNX export see ordinary Linear and Conv2d modules).


class LowRankLinear(nn.Sequential):
    """``Linear(in, out)`` as ``down: Linear(in, r, bias=False)`` then ``up: Linear(r, out)``."""

    def __init__(self, down: nn.Linear, up: nn.Linear) -> None:
        super().__init__(OrderedDict(down=down, up=up))
        self.in_features, self.out_features, self.rank = (
            down.in_features,
            up.out_features,
            up.in_features,
        )

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) matrix this pair computes."""
        return self.up.weight @ self.down.weight


class LowRankConv1x1(nn.Sequential):
    """A 1x1 ``Conv2d(Cin, Cout)`` as ``down: 1x1 Cin -> r`` (stride, padding) then ``up: 1x1 r -> Cout``."""

    def __init__(self, down: nn.Conv2d, up: nn.Conv2d) -> None:
        super().__init__(OrderedDict(down=down, up=up))
        self.in_channels, self.out_channels, self.rank = (
            down.in_channels,
            up.out_channels,
            up.in_channels,
        )

    def dense_weight(self) -> torch.Tensor:
        w = self.up.weight[:, :, 0, 0] @ self.down.weight[:, :, 0, 0]
        return w[:, :, None, None]


class TuckerConv2d(nn.Sequential):
    """Tucker-2 conv: optional ``reduce`` (1x1 Cin -> r_in), ``core`` (k x k r_in -> r_out), optional
    ``expand`` (1x1 r_out -> Cout). A mode whose rank would be full keeps its channels (no 1x1)."""

    def __init__(self, reduce: nn.Conv2d | None, core: nn.Conv2d, expand: nn.Conv2d | None) -> None:
        parts = OrderedDict()
        if reduce is not None:
            parts["reduce"] = reduce
        parts["core"] = core
        if expand is not None:
            parts["expand"] = expand
        super().__init__(parts)
        self.in_channels = reduce.in_channels if reduce is not None else core.in_channels
        self.out_channels = expand.out_channels if expand is not None else core.out_channels
        self.ranks = (core.in_channels, core.out_channels)

    def dense_weight(self) -> torch.Tensor:
        w = self.core.weight  # (r_out, r_in, kh, kw)
        if "reduce" in self._modules:
            w = torch.einsum("abhw,bi->aihw", w, self.reduce.weight[:, :, 0, 0])
        if "expand" in self._modules:
            w = torch.einsum("oa,aihw->oihw", self.expand.weight[:, :, 0, 0], w)
        return w


class CPConv2d(nn.Sequential):
    """Rank-R CP conv: ``reduce`` 1x1 Cin -> R, ``vertical`` depthwise kh x 1, ``horizontal``
    depthwise 1 x kw, ``expand`` 1x1 R -> Cout (the original bias)."""

    def __init__(
        self, reduce: nn.Conv2d, vertical: nn.Conv2d, horizontal: nn.Conv2d, expand: nn.Conv2d
    ) -> None:
        super().__init__(
            OrderedDict(reduce=reduce, vertical=vertical, horizontal=horizontal, expand=expand)
        )
        self.in_channels, self.out_channels, self.rank = (
            reduce.in_channels,
            expand.out_channels,
            reduce.out_channels,
        )

    def dense_weight(self) -> torch.Tensor:
        return torch.einsum(
            "or,ri,rh,rw->oihw",
            self.expand.weight[:, :, 0, 0],
            self.reduce.weight[:, :, 0, 0],
            self.vertical.weight[:, 0, :, 0],
            self.horizontal.weight[:, 0, 0, :],
        )


def _param(t: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(
        t.to(dtype=like.dtype, device=like.device).contiguous(), requires_grad=like.requires_grad
    )


def factorize_linear(layer: nn.Linear, rank: int) -> LowRankLinear:
    """Best rank-``rank`` approximation of ``layer`` (truncated SVD, singular values split evenly
    between the two factors so neither is badly scaled for fine-tuning)."""
    w = layer.weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    down = nn.Linear(layer.in_features, rank, bias=False, **factory)
    up = nn.Linear(rank, layer.out_features, bias=layer.bias is not None, **factory)
    down.weight = _param(root[:, None] * vh[:rank], layer.weight)
    up.weight = _param(u[:, :rank] * root[None, :], layer.weight)
    if layer.bias is not None:
        up.bias = _param(layer.bias.detach(), layer.bias)
    return LowRankLinear(down, up)


def _conv_like(
    conv: nn.Conv2d, cin: int, cout: int, kernel, *, bias: bool = False, **geometry
) -> nn.Conv2d:
    """A Conv2d on ``conv``'s device/dtype; geometry defaults to a plain 1x1."""
    return nn.Conv2d(
        cin,
        cout,
        kernel,
        bias=bias,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
        **geometry,
    )


def factorize_conv1x1(conv: nn.Conv2d, rank: int) -> LowRankConv1x1:
    """Truncated SVD of a 1x1 conv; the stride and padding go on the first (bias-free) half."""
    w = conv.weight.detach()[:, :, 0, 0].double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    down = _conv_like(
        conv,
        conv.in_channels,
        rank,
        1,
        stride=conv.stride,
        padding=conv.padding,
        padding_mode=conv.padding_mode,
    )
    up = _conv_like(conv, rank, conv.out_channels, 1, bias=conv.bias is not None)
    down.weight = _param((root[:, None] * vh[:rank])[:, :, None, None], conv.weight)
    up.weight = _param((u[:, :rank] * root[None, :])[:, :, None, None], conv.weight)
    if conv.bias is not None:
        up.bias = _param(conv.bias.detach(), conv.bias)
    return LowRankConv1x1(down, up)


def tucker2_conv(
    conv: nn.Conv2d, rank_in: int | None, rank_out: int | None, n_iter: int = 0
) -> TuckerConv2d:
    """Tucker-2 decomposition of a k x k conv over its (Cout, Cin) modes.

    ``None`` for a rank keeps that mode whole (no 1x1 on that side); full ranks reproduce the
    layer exactly. The factors are the truncated HOSVD, refined by ``n_iter`` HOOI sweeps. Those
    sweeps lower the weight error a little (0.757 -> 0.733 for a random 512x512x3x3 at half rank)
    but cost most of the time: tensorly 0.10 runs them with full SVDs whatever ``svd`` says
    (ResNet-18 at rank 0.5: ~2 s with none, ~18 s with 2 on one core), and on a briefly trained
    ResNet-18 they did not lower the output error. tensorly is imported here, lazily.
    """
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    w = conv.weight.detach().double()
    modes = [m for m, r in ((0, rank_out), (1, rank_in)) if r is not None]
    ranks = [r for r in (rank_out, rank_in) if r is not None]
    if not modes:
        raise ValueError("tucker2_conv needs at least one of rank_in / rank_out")
    with tl.backend_context("pytorch"):
        (core, factors), _ = partial_tucker(
            w, rank=ranks, modes=modes, init="svd", svd=_gram_svd, n_iter_max=n_iter
        )
    by_mode = dict(zip(modes, factors, strict=True))
    geometry = {
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "padding_mode": conv.padding_mode,
    }
    core_in = rank_in if rank_in is not None else conv.in_channels
    core_out = rank_out if rank_out is not None else conv.out_channels
    core_conv = _conv_like(
        conv,
        core_in,
        core_out,
        conv.kernel_size,
        bias=rank_out is None and conv.bias is not None,
        **geometry,
    )
    core_conv.weight = _param(core, conv.weight)
    reduce = expand = None
    if rank_in is not None:
        reduce = _conv_like(conv, conv.in_channels, rank_in, 1)
        reduce.weight = _param(by_mode[1].T[:, :, None, None], conv.weight)
    if rank_out is not None:
        expand = _conv_like(conv, rank_out, conv.out_channels, 1, bias=conv.bias is not None)
        expand.weight = _param(by_mode[0][:, :, None, None], conv.weight)
        if conv.bias is not None:
            expand.bias = _param(conv.bias.detach(), conv.bias)
    elif conv.bias is not None:
        core_conv.bias = _param(conv.bias.detach(), conv.bias)
    return TuckerConv2d(reduce, core_conv, expand)


def cp_khatri_rao_elements(shape: tuple[int, ...] | torch.Size, rank: int) -> int:
    """Elements of the largest Khatri-Rao product tensorly's CP-ALS materialises for a kernel of
    ``shape`` (the product of the three other modes, times the rank, for the smallest mode)."""
    return math.prod(shape) // min(shape) * rank


def cp_conv(conv: nn.Conv2d, rank: int, n_iter_max: int = 50, seed: int = 0) -> CPConv2d:
    """Rank-``rank`` CP decomposition of a k x k conv (tensorly ``parafac``, ALS from an SVD start).

    Costly on wide layers: each sweep materialises a Khatri-Rao product of
    :func:`cp_khatri_rao_elements` entries (4.5 GB and ~13 s per sweep for 512 -> 512 at rank 256
    on one CPU core), hence the step's ``CP_MAX_KHATRI_RAO`` guard.
    """
    import warnings

    import tensorly as tl
    from tensorly.decomposition import parafac

    w = conv.weight.detach().double()
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        # the SVD start asks every mode for `rank` vectors; the k-sized modes have only k
        warnings.filterwarnings("ignore", message=".*n_eigenvecs.*larger than.*")
        cp = parafac(w, rank=rank, init="svd", n_iter_max=n_iter_max, tol=1e-7, random_state=seed)
    weights, (f_out, f_in, f_h, f_w) = cp.weights, cp.factors
    if not all(torch.isfinite(f).all() for f in (weights, f_out, f_in, f_h, f_w)):
        raise FloatingPointError("CP decomposition did not converge (non-finite factors)")
    f_out = f_out * weights[None, :]
    (ph, pw) = (conv.padding, conv.padding) if isinstance(conv.padding, str) else conv.padding
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    kh, kw = conv.kernel_size
    mode = conv.padding_mode
    reduce = _conv_like(conv, conv.in_channels, rank, 1)
    vertical = _conv_like(
        conv,
        rank,
        rank,
        (kh, 1),
        stride=(sh, 1),
        padding=ph if isinstance(ph, str) else (ph, 0),
        dilation=(dh, 1),
        groups=rank,
        padding_mode=mode,
    )
    horizontal = _conv_like(
        conv,
        rank,
        rank,
        (1, kw),
        stride=(1, sw),
        padding=pw if isinstance(pw, str) else (0, pw),
        dilation=(1, dw),
        groups=rank,
        padding_mode=mode,
    )
    expand = _conv_like(conv, rank, conv.out_channels, 1, bias=conv.bias is not None)
    reduce.weight = _param(f_in.T[:, :, None, None], conv.weight)
    vertical.weight = _param(f_h.T[:, None, :, None], conv.weight)
    horizontal.weight = _param(f_w.T[:, None, None, :], conv.weight)
    expand.weight = _param(f_out[:, :, None, None], conv.weight)
    if conv.bias is not None:
        expand.bias = _param(conv.bias.detach(), conv.bias)
    return CPConv2d(reduce, vertical, horizontal, expand)


# ------------------------------------------------------------------------------------------------
# The step


@dataclass
class _Calls:
    """Input/output shapes of every call of one layer during the example forward pass."""

    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)


@dataclass
class _Plan:
    """What to do with one layer: the method, its ranks, and its cost before/after."""

    kind: str  # linear | conv1x1 | tucker | cp
    ranks: list[int | None]
    params: tuple[int, int]
    macs: tuple[int, int]


def _full_ranks(plan: _Plan, m: nn.Module) -> list[int]:
    """Ranks as channel counts: for Tucker ``[r_in, r_out]``, a mode kept whole shows its size."""
    if plan.kind != "tucker":
        return list(plan.ranks)
    r_in, r_out = plan.ranks
    return [r_in or m.in_channels, r_out or m.out_channels]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(b.double().norm())
    return float((a.double() - b.double()).norm()) / denom if denom > 0 else 0.0


def _fraction(where: str, key: str, value, meaning: str) -> float | None:
    """``value`` as a float in (0, 1], or None; anything else is a ConfigError."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not 0.0 < number <= 1.0:  # also rejects NaN
        raise ConfigError(f"{where}: {key} must be in (0, 1] ({meaning}), got {value!r}")
    return number


@register_step("lowrank")
class LowRankStep(CompressionStep):
    """Factorise Linear and Conv2d layers into low-rank chains (SVD, Tucker-2 or CP).

    Ranks come from ``rank_ratio`` (a fraction of each layer's full rank; 0.5 when neither is
    given) or ``energy`` (the smallest rank keeping that fraction of the squared singular values,
    per channel mode for Tucker); giving both is an error, since it is ambiguous.
    """

    def __init__(
        self,
        rank_ratio: float | None = None,
        energy: float | None = None,
        conv: str | None = "tucker",
        linear: bool = True,
        pointwise: bool = True,
        skip_head: bool = True,
        min_params: int = 4096,
        tucker_iters: int = 0,
        exclude: list[str] | str | None = None,
        epochs: int = 10,
        lr: float | None = None,
    ) -> None:
        super().__init__(epochs=epochs, lr=lr)
        where = "compress step lowrank"
        if rank_ratio is not None and energy is not None:
            raise ConfigError(
                f"{where}: rank_ratio={rank_ratio} and energy={energy} are both set; choose one "
                "(set the other to null)"
            )
        rank_ratio = _fraction(where, "rank_ratio", rank_ratio, "fraction of each layer's rank")
        energy = _fraction(where, "energy", energy, "fraction of the squared singular values kept")
        conv = "none" if conv in (None, False) else str(conv).lower()
        if conv not in CONV_METHODS:
            raise ConfigError(
                f"{where}: conv={conv!r} is not a method; valid: {', '.join(CONV_METHODS)}"
            )
        if conv == "cp" and energy is not None:
            raise ConfigError(
                f"{where}: energy picks ranks from singular values, which a CP decomposition "
                "does not have; use rank_ratio with conv=cp (or conv=tucker with energy)"
            )
        if not linear and not pointwise and conv == "none":
            raise ConfigError(
                f"{where}: linear=false, pointwise=false and conv=none: nothing to do"
            )
        if int(tucker_iters) < 0:
            raise ConfigError(f"{where}: tucker_iters must be >= 0, got {tucker_iters}")
        if int(min_params) < 0:
            raise ConfigError(f"{where}: min_params must be >= 0, got {min_params}")
        if isinstance(exclude, str):
            exclude = [exclude]
        self.rank_ratio, self.energy = rank_ratio, energy
        if self.rank_ratio is None and self.energy is None:
            self.rank_ratio = 0.5
        self.conv = conv
        self.linear = bool(linear)
        self.pointwise = bool(pointwise)
        self.skip_head = bool(skip_head)
        self.min_params = int(min_params)
        self.tucker_iters = int(tucker_iters)
        self.exclude = [str(p) for p in (exclude or [])]

    # -- rank choice and cost ----------------------------------------------------------------

    def _matrix_rank(self, w2d: torch.Tensor) -> int:
        full = min(w2d.shape)
        if self.energy is not None:
            return min(full, rank_for_energy(_svals(w2d), self.energy))
        return _ratio_rank(full, self.rank_ratio)

    def _plan(self, m: nn.Module, calls: _Calls) -> _Plan | str:
        """The factorisation of ``m`` that saves both params and MACs, or why there is none."""
        if isinstance(m, nn.Linear):
            out_f, in_f = m.weight.shape
            r = self._matrix_rank(m.weight)
            tokens = sum(math.prod(i[:-1]) for i, _ in calls.shapes)
            return _Plan(
                "linear",
                [r],
                (out_f * in_f, r * (in_f + out_f)),
                (tokens * out_f * in_f, tokens * r * (in_f + out_f)),
            )
        cout, cin, kh, kw = m.weight.shape
        out_px = sum(math.prod(o[2:]) for _, o in calls.shapes)
        if kh == kw == 1:
            r = self._matrix_rank(m.weight[:, :, 0, 0])
            return _Plan(
                "conv1x1",
                [r],
                (cout * cin, r * (cin + cout)),
                (out_px * cout * cin, out_px * r * (cin + cout)),
            )
        in_px = sum(math.prod(i[2:]) for i, _ in calls.shapes)
        before = (cout * cin * kh * kw, out_px * cout * cin * kh * kw)
        if self.conv == "cp":
            # the CP rank is a fraction of the smaller channel count
            r = _ratio_rank(min(cin, cout), self.rank_ratio)
            if cp_khatri_rao_elements(m.weight.shape, r) > CP_MAX_KHATRI_RAO:
                return "too large for CP with tensorly (use conv: tucker)"
            # the vertical depthwise conv runs on (H_out, W_in) maps
            mid_px = sum(o[2] * i[3] for i, o in calls.shapes)
            return _Plan(
                "cp",
                [r],
                (before[0], r * (cin + kh + kw + cout)),
                (before[1], in_px * cin * r + mid_px * r * kh + out_px * r * (kw + cout)),
            )
        w = m.weight.detach()
        if self.energy is not None:
            r_out = rank_for_energy(_svals(w.reshape(cout, -1)), self.energy)
            r_in = rank_for_energy(_svals(w.transpose(0, 1).reshape(cin, -1)), self.energy)
        else:
            r_out, r_in = _ratio_rank(cout, self.rank_ratio), _ratio_rank(cin, self.rank_ratio)
        r_in = None if r_in >= cin else r_in  # a full-rank mode keeps its channels
        r_out = None if r_out >= cout else r_out
        a, b = r_in or cin, r_out or cout
        params = a * b * kh * kw + (cin * r_in if r_in else 0) + (cout * r_out if r_out else 0)
        macs = out_px * a * b * kh * kw
        macs += (in_px * cin * r_in if r_in else 0) + (out_px * cout * r_out if r_out else 0)
        if r_in is None and r_out is None:
            return "no reduction at the chosen rank"
        return _Plan("tucker", [r_in, r_out], (before[0], params), (before[1], macs))

    def _factorise(self, m: nn.Module, plan: _Plan) -> nn.Module:
        if plan.kind == "linear":
            return factorize_linear(m, plan.ranks[0])
        if plan.kind == "conv1x1":
            return factorize_conv1x1(m, plan.ranks[0])
        if plan.kind == "tucker":
            return tucker2_conv(m, *plan.ranks, n_iter=self.tucker_iters)
        return cp_conv(m, plan.ranks[0])

    # -- which layers ------------------------------------------------------------------------

    def _skip_reason(
        self, name: str, m: nn.Module, calls: _Calls | None, shared: bool
    ) -> str | None:
        if any(
            fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*")
            for p in self.exclude
        ):
            return "excluded by pattern"
        if type(m) not in (nn.Linear, nn.Conv2d):
            # e.g. timm's Conv2dSame pads in forward(): a plain replacement would change results
            return "Linear/Conv2d subclass with its own forward"
        if calls is None or not calls.shapes:
            return "not called through forward() (its weight is used directly)"
        if shared:
            return "shared module or tied weight"
        if isinstance(m, nn.Conv2d):
            if m.groups != 1:
                return "grouped or depthwise conv"
            if m.kernel_size == (1, 1):
                if not self.pointwise:
                    return "1x1 conv (pointwise: false)"
            elif self.conv == "none":
                return "k x k conv (conv: none)"
        elif not self.linear:
            return "linear (linear: false)"
        if m.weight.numel() < self.min_params:
            return f"below min_params ({self.min_params})"
        return None

    @staticmethod
    def _head_names(model: nn.Module, order: list[str]) -> set[str]:
        """The classifier: timm's ``get_classifier()`` and the last Linear/Conv run in forward."""
        names = set(order[-1:])
        get = getattr(model, "get_classifier", None)
        if callable(get):
            try:
                heads = get()
            except Exception:  # some models raise when they have no head
                heads = None
            heads = heads if isinstance(heads, (tuple, list)) else [heads]
            ids = {id(h) for h in heads if isinstance(h, nn.Module)}
            for name, mod in model.named_modules():
                if id(mod) in ids:
                    names.add(name)
                    names.update(f"{name}.{sub}" for sub, _ in mod.named_modules() if sub)
        return names

    # -- prepare -----------------------------------------------------------------------------

    def check(self, model: nn.Module, example: torch.Tensor) -> None:
        """A 3D CNN has nothing this step factorises (3D kernels are not supported): say so
        before the base model trains, not after."""
        if not any(isinstance(m, nn.Conv3d) for m in model.modules()):
            return
        candidates = [
            m
            for m in model.modules()
            if type(m) in (nn.Linear, nn.Conv2d) and m.weight.numel() >= self.min_params
        ]
        if len(candidates) <= int(self.skip_head):
            raise ConfigError(
                "compress step lowrank: low-rank factorisation of 3D convolutions (Conv3d) is "
                "not supported, and this volume model has no Linear layer to factorise besides "
                "its head. Use prune / ptq / kd for a 3D CNN, or a 3D Transformer or "
                "linear-complexity model (vit3d, mobilevit3d, vim3d, trimamba3d), whose Linear "
                "layers it factorises"
            )

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        """Factorise every eligible layer of ``model`` in place; fill ``self.report``."""
        was_training = model.training
        model.eval()  # BatchNorm / dropout must not change between the before and after outputs
        try:
            return self._factorise_model(model, ctx)
        finally:
            model.train(was_training)

    def _factorise_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        arch = ctx.cfg.model.arch
        device = next(model.parameters()).device
        batch = ctx.example_input(16).to(device)
        one = batch[:1]

        # one hooked forward pass: which layers run, in what order, on what shapes
        candidates = {
            n: m for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, nn.Conv2d))
        }
        calls = {n: _Calls() for n in candidates}
        order: list[str] = []

        def hook(name):
            def record(_mod, inputs, output):
                if inputs:  # a call with keyword arguments only is not a plain Linear/Conv2d call
                    calls[name].shapes.append((tuple(inputs[0].shape), tuple(output.shape)))
                order.append(name)

            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in candidates.items()]
        try:
            with torch.no_grad():
                model(one)
        finally:
            for h in handles:
                h.remove()
        with torch.no_grad():
            logits_before = model(batch)
        params_before, macs_before = count_parameters(model), count_macs(model, one)

        seen_mods = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        seen_params = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        heads = self._head_names(model, order) if self.skip_head else set()

        factorised, skipped = [], []
        for name, m in candidates.items():
            shared = seen_mods[id(m)] > 1 or any(seen_params[id(p)] > 1 for p in m.parameters())
            reason = "classifier head (skip_head)" if name in heads else None
            reason = reason or self._skip_reason(name, m, calls.get(name), shared)
            plan = None
            if reason is None:
                plan = self._plan(m, calls[name])
                if isinstance(plan, str):
                    reason = plan
                elif plan.params[1] >= plan.params[0] or plan.macs[1] >= plan.macs[0]:
                    reason = "no reduction at the chosen rank"
            if reason is not None:
                skipped.append({"name": name, "reason": reason})
                continue
            try:
                new = self._factorise(m, plan)
            except FloatingPointError as err:  # CP that did not converge: keep the layer
                skipped.append({"name": name, "reason": f"decomposition failed: {err}"})
                continue
            weight_error = _rel(new.dense_weight().detach(), m.weight.detach())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
            factorised.append(
                {
                    "name": name,
                    "method": {"linear": "svd", "conv1x1": "svd"}.get(plan.kind, plan.kind),
                    "shape": list(m.weight.shape),
                    "ranks": _full_ranks(plan, m),
                    "params": list(plan.params),
                    "macs": list(plan.macs),
                    "weight_rel_error": round(weight_error, 6),
                }
            )

        reasons = Counter(s["reason"] for s in skipped)
        if not factorised:
            detail = "; ".join(f"{n} x {r}" for r, n in reasons.most_common()) or "no layers"
            raise ConfigError(
                f"compress step lowrank found nothing to factorise in model {arch!r} "
                f"(Linear/Conv2d layers skipped: {detail}). Lower min_params or rank_ratio/energy, "
                "or check exclude / linear / pointwise / conv."
            )

        try:
            with torch.no_grad():
                logits_after = model(batch)
        except Exception as err:
            raise ConfigError(
                f"compress step lowrank: model {arch!r} no longer runs after factorisation "
                f"({type(err).__name__}: {err}); some module probably reads a replaced layer's "
                "weight directly: list it in exclude"
            ) from err
        params_after, macs_after = count_parameters(model), count_macs(model, one)
        out_error = _rel(logits_after, logits_before)
        self.report = {
            "rank_ratio": self.rank_ratio,
            "energy": self.energy,
            "conv": self.conv,
            "n_factorised": len(factorised),
            "n_skipped": len(skipped),
            "skipped_reasons": dict(reasons),
            "factorised": factorised,
            "skipped": skipped,
            "params_before": params_before,
            "params_after": params_after,
            "macs_before": macs_before,
            "macs_after": macs_after,
            "output_rel_error": round(out_error, 6),
            "output_error_batch": int(batch.shape[0]),
        }
        log.info(
            "lowrank %s: factorised %d layers (skipped %d); params %d -> %d (%.1f%%), "
            "MACs %d -> %d (%.1f%%); logits rel. error %.4f before fine-tuning",
            arch,
            len(factorised),
            len(skipped),
            params_before,
            params_after,
            100 * params_after / params_before,
            macs_before,
            macs_after,
            100 * macs_after / max(1, macs_before),
            out_error,
        )
        return model
