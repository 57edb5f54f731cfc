"""Constants and the CLI command line shared by the recaption tests."""

from __future__ import annotations

import sys

N_IMAGES, SPS = 24, 8  # the small test dataset: 3 shards

# the CLI in a subprocess, with the recaption commands registered (until cli.py lists them)
CLI = [sys.executable, "-c",
       "import sys; from finevit import cli; "
       "cli.STAGE_COMMAND_MODULES[:] = sorted(set(cli.STAGE_COMMAND_MODULES) | {'finevit.cmd_recaption'}); "
       "sys.exit(cli.main(sys.argv[1:]))"]  # fmt: skip
