"""A run's test split under image corruptions (noise, blur, contrast, brightness, JPEG,
pixelation) at 5 severities, on PyTorch or its ONNX fp32 / int8 file. Usage: see --help or README."""

import sys

from medlite.robustness.run import main

if __name__ == "__main__":
    sys.exit(main())
