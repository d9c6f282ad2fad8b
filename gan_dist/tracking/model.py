"""The trained generator as an MLflow pyfunc model: the gan_dist generator file is the model's data, loaded
back by gan_dist's weights-only ``load_generator``, so no pickled code is stored in or run from the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema, TensorSpec

from gan_dist.tracking.info import package_versions
from gan_dist.models.io import load_generator

GENERATOR_MODEL_NAME = "generator"
# MLflow imports this module to load the model and calls its _load_pyfunc. Models logged before tracking
# became a package name gan_dist.tracking, whose __init__ re-exports _load_pyfunc from here.
LOADER_MODULE = "gan_dist.tracking.model"


def log_generator_model(generator_file: Path, run_id: str, experiment_id: str, register_as: str | None) -> str:
    """Log a file from ``export_generator`` as run ``run_id``'s model "generator", registered as
    ``register_as`` if given; returns the model URI (``models:/m-...``)."""
    _, meta = load_generator(generator_file)  # refuses anything but a plain-data gan_dist export
    mlflow.set_experiment(experiment_id=experiment_id)  # Model.log files the model under it
    return Model.log(
        artifact_path=None,
        name=GENERATOR_MODEL_NAME,
        flavor=mlflow.pyfunc,
        run_id=run_id,
        step=meta["step"],
        registered_model_name=register_as,
        metadata={"gan_dist": meta},
        loader_module=LOADER_MODULE,  # _load_pyfunc below: no pickled code in the model
        data_path=str(generator_file),
        signature=generator_signature(meta),
        pip_requirements=[f"{p}=={v}" for p, v in package_versions().items() if p in ("torch", "gan_dist")],
    ).model_uri


def generator_signature(meta: dict[str, Any]) -> ModelSignature:
    """z [N, z_dim] float32 -> images [N, C, R, R] float32 in [-1, 1]."""
    z_dim, res, ch = meta["model"]["z_dim"], meta["resolution"], meta["channels"]
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, z_dim))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, ch, res, res))]),
    )


class GeneratorModel:
    """What ``mlflow.pyfunc.load_model`` returns the logged generator as."""

    def __init__(self, generator: torch.nn.Module) -> None:
        self.generator = generator

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        """z [N, z_dim] -> images [N, C, R, R] in [-1, 1]."""
        with torch.no_grad():
            return self.generator(torch.as_tensor(np.asarray(model_input, dtype=np.float32))).numpy()

    def get_raw_model(self) -> torch.nn.Module:
        return self.generator


def _load_pyfunc(data_path: str) -> GeneratorModel:
    """MLflow's pyfunc loader hook: weights load with torch.load(weights_only=True) via load_generator."""
    return GeneratorModel(load_generator(data_path)[0])
