"""Export a trained run for the edge: ONNX fp32, ONNX int8 and torch.export, each checked against
PyTorch on the test split; writes <run>/export/ and the model card. Usage: see --help or README."""

import sys

from medlite.deploy.commands import main_export

if __name__ == "__main__":
    sys.exit(main_export())
