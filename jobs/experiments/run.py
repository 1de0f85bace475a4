"""Reproduce one of the papers' tables: ``python -m jobs.experiments.run lcn_table1 --data DIR [--seeds N] [--set k=v ...]``.

Tables (each a grid space in this folder, every cell an MLflow child run, seeds repeated):
lcn_table1 (CRP ablation), lcn_table2 (backbone + CRP), lcn_table3 (K1 x K2), cain_table1 (context
encoder), cain_table2 (backbone + TCN), cain_table3 (backbone + MSIA), cain_table4 (PEG placement and
aggregation). The table (mean ± spread over seeds of the test metrics of each cell's checkpoint chosen on
validation) is printed on stderr and logged to the search's parent run as ``table.md``/``table.csv``;
the last stdout line is the JSON with the rows. ``--set`` fixes any config key (the budget: data
sizes, model sizes, epochs). ``--in-process`` trains the cells in this process without Ray
(``fit_local``: the same validation cut, early stopping and validation-chosen epoch as a Ray run), each still an
MLflow child run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from raylsm.cli import emit, main
from raylsm.experiments.tables import parser, run_table


def _run(args) -> int:
    emit(run_table(args))
    return 0


def build_parser():
    """The runner's options over the grid spaces beside this file."""
    p = parser(Path(__file__).resolve().parent)
    p.set_defaults(fn=_run)
    return p


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], parser=build_parser()))
