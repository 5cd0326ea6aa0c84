"""Where int8 time goes: a run's OpenVINO fp32 and int8 files timed layer by layer at batch 1.
Usage: see --help or the README ("Deployment to the edge")."""

import sys

from medlite.deploy.layer_profile import main

if __name__ == "__main__":
    sys.exit(main())
