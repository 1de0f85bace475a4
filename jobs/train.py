"""Train one model on Ray: ``python -m jobs.train --model lcn --data DIR`` (same flags as ``raylsm train``).

Submitted with ``ray job submit --working-dir . -- python -m jobs.train ...`` it
connects to the cluster it runs on (RAY_ADDRESS is set by the job); run
directly, it starts a local Ray. The last stdout line is the JSON result.
"""

from __future__ import annotations

import sys

from raylsm.cli import add_train_args, cmd_train, entry_parser, main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], parser=entry_parser("python -m jobs.train", __doc__, add_train_args, cmd_train)))
