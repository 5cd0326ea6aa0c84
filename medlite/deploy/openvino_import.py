"""Importing OpenVINO (and NNCF) without their telemetry.

``openvino`` and ``nncf`` ship usage telemetry (the ``openvino-telemetry`` package), which the
model converter sends unless the user opted out. :func:`import_openvino` hides that package from
the interpreter before either library is imported, so both fall back to their built-in no-op
stubs: nothing is ever sent, whatever the machine's consent file says.
"""

from __future__ import annotations

import sys

TELEMETRY_PACKAGES = ("openvino_telemetry", "openvino_telemetry.backend")


def block_telemetry() -> None:
    """Make ``import openvino_telemetry`` fail, so openvino and nncf use their no-op stubs."""
    for name in TELEMETRY_PACKAGES:
        sys.modules[name] = None  # type: ignore[assignment]  # an import of it raises ImportError


def import_openvino():
    block_telemetry()
    import openvino

    return openvino
