"""The kept checkpoint logged as an MLflow model from code (``raylsm/serving.py``): weights only, no pickle,
with a signature and an input example (docs/design.md, "MLflow record")."""

from __future__ import annotations

import warnings
from pathlib import Path

from raylsm.train.tracking import client
from raylsm.train.uri import real_uri


def input_example(job, manifest, rows: int = 3):
    """A few contract rows of the test split as a DataFrame (the model's input example and signature)."""
    import pyarrow.parquet as pq

    from raylsm.data.collate import collate_spec
    from raylsm.data.contract import shard_files

    spec = collate_spec(job.data, manifest)
    cols = [c for c in spec.columns if c != "label"]
    table = pq.read_table(shard_files(job.data.path, "test")[0], columns=cols, partitioning=None).slice(0, rows)
    return table.to_pandas()


def log_model(tracking_uri: str, run_id: str, checkpoint_dir: str, job, manifest) -> str:
    """Log the kept checkpoint as a code-defined pyfunc model (no pickle) with a signature; return its URI."""
    import mlflow
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    import raylsm
    from raylsm.data.collate import collate_spec
    from raylsm.train.checkpoint import model_from_checkpoint
    from raylsm.train.step import score_frame

    example = input_example(job, manifest)
    model, _ = model_from_checkpoint(checkpoint_dir)
    spec = collate_spec(job.data, manifest)
    with warnings.catch_warnings():  # the ids are integers by the contract: MLflow's hint about missing values
        warnings.filterwarnings("ignore", message=".*Inferred schema contains integer column")
        signature = infer_signature(example, score_frame(model.eval(), spec, example))
    package = Path(raylsm.__file__).resolve().parent
    client(tracking_uri)  # no URL printed for a credentialed store
    mlflow.set_tracking_uri(real_uri(tracking_uri))
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MLflow's hints about type hints and integer columns
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(package / "serving.py"),
            artifacts={"checkpoint": checkpoint_dir},
            code_paths=[str(package)],
            pip_requirements=_requirements(),
            signature=signature,
            input_example=example,
        )
    return info.model_uri


def _requirements() -> list[str]:
    """What the logged model needs to load: published packages only (raylsm itself travels as code)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "numpy", "pyarrow", "pandas", "pyyaml", "mlflow")]
