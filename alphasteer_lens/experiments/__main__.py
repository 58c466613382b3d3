"""``python -m alphasteer_lens.experiments``: the ``alphasteer-lens`` command line."""

import sys

from alphasteer_lens.experiments.cli import main

sys.exit(main())
