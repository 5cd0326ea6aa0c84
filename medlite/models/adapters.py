"""Wrappers that let a network take another network's input."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class TeacherInput(nn.Module):
    """Adapts the student's input batch to what the teacher was trained on: size and normalisation
    (a dense teacher's logit maps come back at the student's input size)."""

    def __init__(
        self,
        teacher: nn.Module,
        size: int | None = None,
        student_norm: tuple[list[float], list[float]] | None = None,
        teacher_norm: tuple[list[float], list[float]] | None = None,
    ) -> None:
        super().__init__()
        self.teacher, self.size = teacher, size
        self.renorm = None
        if student_norm and teacher_norm and student_norm != teacher_norm:
            (ms, ss), (mt, st) = student_norm, teacher_norm
            # x_t = (x_s * s_s + m_s - m_t) / s_t = x_s * a + b
            a = [s / t for s, t in zip(ss, st, strict=True)]
            b = [(m - n) / t for m, n, t in zip(ms, mt, st, strict=True)]
            self.renorm = (
                torch.tensor(a).view(1, -1, 1, 1),
                torch.tensor(b).view(1, -1, 1, 1),
            )

    def around(self, net: nn.Module) -> TeacherInput:
        """The same adaptation in front of another network (one member of an ensemble, trained
        on its own)."""
        other = TeacherInput(net, self.size)
        other.renorm = self.renorm
        return other

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.renorm is not None:
            a, b = (t.to(x.device, x.dtype) for t in self.renorm)
            x = x * a + b
        hw = x.shape[-2:]
        if self.size and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        out = self.teacher(x)
        if out.ndim == 4 and out.shape[-2:] != hw and out.shape[-2:] == x.shape[-2:]:
            # a dense (segmentation) teacher at another resolution: its logit maps back at the
            # student's, where the masks, metrics and the student's logits are
            out = F.interpolate(out, size=hw, mode="bilinear", align_corners=False)
        return out


class LogitEnsemble(nn.Module):
    """Independently trained networks as one teacher: the mean of their logits (per class, or per
    class and pixel). An ensemble beats its members, so it can teach a student of the members'
    own size something it does not learn alone (the setting of Hinton et al.'s distillation)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)
