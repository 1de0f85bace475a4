"""The logged MLflow model: code plus a weights-only checkpoint, so loading it unpickles nothing.

MLflow "models from code": this file is the model's definition (``mlflow.models.set_model``
at the bottom); the run's checkpoint directory travels as the artifact ``checkpoint``
(``checkpoint.pt`` read with ``torch.load(weights_only=True)`` and ``job.json``), and the
``raylsm`` package travels in the model's ``code/`` folder. Input: a pandas DataFrame of
dataset-contract rows (``user_id``, ``item_id``, ``item_cate``, ``profile_*``, the list
columns; ``label`` optional). Output: the click probability of each row.

    model = mlflow.pyfunc.load_model(run.info.artifact_uri + "/model")
    probs = model.predict(frame)
"""

from __future__ import annotations

import mlflow.pyfunc
import mlflow.models
import pandas as pd


class LifelongCTRModel(mlflow.pyfunc.PythonModel):
    """Scores contract rows with the checkpoint's model (sigmoid of its logits)."""

    def load_context(self, context) -> None:
        from raylsm.data.collate import collate_spec
        from raylsm.train.checkpoint import model_from_checkpoint

        self.model, meta = model_from_checkpoint(context.artifacts["checkpoint"])
        self.model.eval()
        data = meta["job"]["data"]
        self.spec = collate_spec(data, meta["vocab"]["profile"])

    def predict(self, context, model_input: pd.DataFrame, params=None):  # the logged signature checks the columns
        from raylsm.train.step import score_frame

        return score_frame(self.model, self.spec, model_input)


mlflow.models.set_model(LifelongCTRModel())
