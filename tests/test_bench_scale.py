"""`raylsm bench scale`: mistakes are one-line errors. Its figures and ratios are checked on the scale part of the
quick suite run (tests/test_bench_suite.py: dense and sharded, 1 and 2 workers).
"""

from __future__ import annotations

from raylsm.cli import main


def test_scale_mistakes_are_one_line_errors(capsys):
    assert main(["bench", "scale", "--modes", "rows", "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raylsm: error: --modes")
