"""Lightweight CNNs written in medlite, and MONAI's CIFAR-style ResNets (timm supplies the rest)."""

from medlite.models.cnn import litecnn, resnet_cifar  # noqa: F401  (registers the models)
