"""Local inference with a trained medlite run: class probabilities (classification) or masks,
overlays and class areas (segmentation) for an image file or a folder (PNG/JPEG, DICOM, 2D
NIfTI). Runs on this machine only; nothing is uploaded. See README."""

import sys

from medlite.deploy.commands import main_predict

if __name__ == "__main__":
    sys.exit(main_predict())
