"""Volume (3D) classifiers for (N, C, D, H, W) inputs such as MedMNIST 3D's 28^3 and 64^3 volumes:
two or more per paradigm, so 3D results can be compared the way 2D ones are."""

from medlite.models.volume import (  # noqa: F401  (registers the models)
    acs,
    mobilenet3d,
    mobilevit3d,
    resnet3d,
    trimamba3d,
    vim3d,
    vit3d,
)
