"""Peak memory of inference, measured the way an edge box sees it: a fresh process per runtime.

Inside one long-lived process, allocators reuse memory and the second runtime measured looks
free. So each runtime runs in its own Python process that imports only what it needs (ONNX
Runtime without PyTorch for the ONNX files), loads the model, runs one batch-1 forward and one
large batch, and reports its resident memory (Linux ``VmRSS``/``VmHWM``): after imports, after
loading, and the peaks. This file is also that child's script, so it imports nothing from
medlite at module level.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _child(runtime: str, target: str, shape: list[int], batch: int, threads: int) -> dict:
    import numpy as np

    if runtime == "pytorch":
        import torch

        torch.set_num_threads(threads)
        import medlite.build  # noqa: F401 - what loading a run imports, before the baseline
        import medlite.checkpoints  # noqa: F401
        from medlite.deploy.run_dir import TrainedRun

        after_import = _status_mb("VmRSS")
        model = TrainedRun.load(target).torch_model()
        loaded = _status_mb("VmRSS")

        def run(n: int) -> None:
            with torch.inference_mode():
                model(torch.zeros(n, *shape))

    elif runtime.startswith("openvino"):  # OpenVINO alone, no PyTorch, as on an edge box
        sys.modules["openvino_telemetry"] = None  # as in openvino_runtime.py: nothing is sent
        import openvino as ov

        core = ov.Core()
        if 'type="SelectiveScan" version="medlite"' in Path(target).read_text(errors="replace"):
            # its scans run medlite's kernel (through torch): what deploying it costs
            from medlite.deploy.openvino_scan import add_scan_extension

            add_scan_extension(core)
        after_import = _status_mb("VmRSS")
        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
        request = core.compile_model(target, "CPU", config).create_infer_request()
        loaded = _status_mb("VmRSS")

        def run(n: int) -> None:
            request.infer({0: np.zeros((n, *shape), dtype=np.float32)})

    elif runtime.startswith("executorch"):  # the ExecuTorch runtime (its tensors are torch's)
        import torch
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        portable_lib._unsafe_reset_threadpool(threads)
        after_import = _status_mb("VmRSS")
        method = Runtime.get().load_program(target).load_method("forward")
        loaded = _status_mb("VmRSS")

        def run(n: int) -> None:
            for _ in range(n):  # the program runs at batch 1
                method.execute([torch.zeros(1, *shape)])

    else:
        import onnxruntime as ort

        after_import = _status_mb("VmRSS")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(target, opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        loaded = _status_mb("VmRSS")

        def run(n: int) -> None:
            sess.run(None, {name: np.zeros((n, *shape), dtype=np.float32)})

    run(1)
    peak_1 = _status_mb("VmHWM")
    run(batch)
    peak_batch = _status_mb("VmHWM")
    return {
        "after_import_mb": after_import,
        "loaded_mb": loaded,
        "peak_batch1_mb": peak_1,
        "peak_batch_mb": peak_batch,
        "batch": batch,
    }


def measure_memory(
    runtime: str, target: str | Path, shape: tuple[int, ...], batch: int = 64, threads: int = 1
) -> dict | None:
    """Run the child for one runtime; ``target`` is the run dir (pytorch) or the ONNX file.

    Returns MB figures, plus ``model_mb`` (peak at batch 1 minus the process after its imports:
    what the model and its activations add); None where /proc is unavailable or the child failed.
    """
    if not sys.platform.startswith("linux"):
        return None
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        runtime,
        str(target),
        ",".join(map(str, shape)),
        str(batch),
        str(threads),
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
        out = json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as err:
        detail = getattr(err, "stderr", None) or ""
        log.warning("memory of %s not measured: %s %s", runtime, err, detail[-500:])
        return None
    if out.get("peak_batch1_mb") is None or out.get("after_import_mb") is None:
        return None
    out["model_mb"] = round(out["peak_batch1_mb"] - out["after_import_mb"], 2)
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


if __name__ == "__main__":
    sys.path.pop(0)  # this file's folder: its openvino_runtime.py/onnx.py must not shadow packages
    rt, tgt, shp, bs, th = sys.argv[1:6]
    result = _child(rt, tgt, [int(s) for s in shp.split(",")], int(bs), int(th))
    print(json.dumps(result))
