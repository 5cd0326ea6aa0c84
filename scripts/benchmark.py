"""Latency, throughput, memory and size of a run's model on this machine: PyTorch eager, ONNX
Runtime fp32 and int8 side by side at 1 and 2 threads. Usage: see --help or README."""

import sys

from medlite.deploy.commands import main_benchmark

if __name__ == "__main__":
    sys.exit(main_benchmark())
