"""Constants and the CLI command line shared by the recaption tests."""

from __future__ import annotations

import sys

N_IMAGES, SPS = 24, 8  # the small test dataset: 3 shards

# the CLI in a subprocess
CLI = [sys.executable, "-m", "finevit"]
