"""`python -m rlhf_plugins.cli ...` runs the command line (e.g. under `accelerate launch -m`)."""
import sys

from .main import main

sys.exit(main())
