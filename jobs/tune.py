"""Search hyperparameters on Ray: ``python -m jobs.tune --space tune_spaces/lcn.yaml --data DIR`` (same flags as ``raylsm tune``).

Submitted with ``ray job submit --working-dir . -- python -m jobs.tune ...`` it runs the
search on the cluster it was submitted to (RAY_ADDRESS is set by the job); run directly,
it starts a local Ray. The last stdout line is the JSON summary.
"""

from __future__ import annotations

import sys

from raylsm.cli import add_tune_args, cmd_tune, entry_parser, main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], parser=entry_parser("python -m jobs.tune", __doc__, add_tune_args, cmd_tune)))
