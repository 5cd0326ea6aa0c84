"""Where int8 time goes: a run's OpenVINO fp32 and int8 files timed layer by layer at batch 1.

    python scripts/profile_int8.py <run dir> [--threads 1] [--repeats 50] [--top 8]

Prints, for each file, the time per operation type and precision (which kernels really ran
int8), the share of time in each precision, and the slowest layers of the int8 file; writes
``<run dir>/export/layer_profile.json``. The run must have been exported with ``export=openvino``
or ``export=all`` (``python scripts/export.py run=<run dir> formats=[openvino_fp32,openvino_int8]``).
Layer times are OpenVINO's own counters; their sum is a little under the end-to-end latency
(the inference call's overhead is in no layer).
"""

import sys

from medlite.deploy.layer_profile import main

if __name__ == "__main__":
    sys.exit(main())
