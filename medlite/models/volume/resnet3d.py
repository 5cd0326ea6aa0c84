"""3D ResNet-18: MONAI's ``resnet18(spatial_dims=3)``, MedMNIST v2's 3D reference.

Why: it is the 3D baseline of the MedMNIST v2 paper (Yang et al., Scientific Data 2023) and
medlite's default 3D distillation teacher (conf/teacher/resnet18_3d.yaml); every lightweight 3D
model is judged against it. About 33 M parameters.

Size policy (``stem_stride_for`` of LiteCNN: the first map is 28-55 voxels per side):
28^3 and 32^3/48^3 -> a 3^3 stride-1 stem and no max-pool (the small-input stem MedMNIST uses,
so layer4 still sees 4^3 at 28^3); 64^3 -> a 5^3 stride-2 stem (first map 32^3), 128^3 ->
9^3 stride 4. ``stem_stride=`` overrides it. Shortcut "B" (1x1x1 conv projections).
"""

from __future__ import annotations

from torch import nn

from medlite.models.cnn.litecnn import stem_stride_for
from medlite.models.registry import register_model


def stem_kernel(stride: int) -> int:
    """3 at stride 1, else ``2 * stride + 1`` (the kernel covers its stride with overlap)."""
    return 3 if stride == 1 else 2 * stride + 1


@register_model("resnet18_3d", paradigm="cnn", min_size=28, task="classification", dims=3)
def resnet18_3d(
    num_classes: int,
    in_chans: int = 1,
    img_size: int = 28,
    stem_stride: int | None = None,
    widen_factor: float = 1.0,
    shortcut_type: str = "B",
) -> nn.Module:
    """MONAI 3D ResNet-18 with an input-size-aware stem (MedMNIST v2's 3D reference)."""
    from monai.networks.nets import resnet18

    stride = stem_stride or stem_stride_for(img_size)
    return resnet18(
        spatial_dims=3,
        n_input_channels=in_chans,
        num_classes=num_classes,
        conv1_t_size=stem_kernel(stride),
        conv1_t_stride=stride,
        no_max_pool=True,
        shortcut_type=shortcut_type,
        widen_factor=widen_factor,
    )
