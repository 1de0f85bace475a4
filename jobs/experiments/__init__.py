"""The papers' tables as grid searches: ``python -m jobs.experiments.run <table> --data DIR`` (see run.py)."""
