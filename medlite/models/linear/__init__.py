"""Linear-complexity models nothing in timm runs on CPU: Vision Mamba, VMamba/MedMamba (SS2D) and
Vision-RWKV, on medlite's own selective-scan and WKV ops (:mod:`medlite.models.ops`)."""

from medlite.models.linear import vim, vmamba, vrwkv  # noqa: F401  (registers the models)
