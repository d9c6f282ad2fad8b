"""The trained generator as an MLflow pyfunc model: the gan_dist generator file is the model's data, loaded
back by gan_dist's weights-only ``load_generator``, so no pickled code is stored in or run from the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import Model, ModelSignature
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

from gan_dist.tracking.info import package_versions
from gan_dist.models import model_config
from gan_dist.models.io import generate, load_generator

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
    """z [N, z_dim] float32 -> images [N, C, R, R] float32 in [-1, 1]; params ``truncation_psi`` (1.0: none,
    style-based generators only) and ``class_label`` (a conditional generator's class; -1: drawn uniformly)."""
    z_dim, res, ch = meta["model"]["z_dim"], meta["resolution"], meta["channels"]
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, z_dim))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, ch, res, res))]),
        params=ParamSchema([ParamSpec("truncation_psi", "float", 1.0), ParamSpec("class_label", "long", -1)]),
    )


class GeneratorModel:
    """What ``mlflow.pyfunc.load_model`` returns the logged generator as."""

    def __init__(self, generator: torch.nn.Module, num_classes: int = 0) -> None:
        self.generator, self.num_classes = generator, num_classes

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        """z [N, z_dim] -> images [N, C, R, R] in [-1, 1]; ``params={"truncation_psi": 0.7}`` truncates,
        ``{"class_label": 3}`` draws class 3 from a conditional generator (unset: a uniform class per row)."""
        params = params or {}
        psi, label = float(params.get("truncation_psi", 1.0)), int(params.get("class_label", -1))
        with torch.no_grad():
            z = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            labels = None
            if self.num_classes:
                if label >= self.num_classes:
                    raise ValueError(f"class_label must be in 0..{self.num_classes - 1}, got {label}")
                labels = torch.full((len(z),), label) if label >= 0 else torch.randint(self.num_classes, (len(z),))
            return generate(self.generator, z, psi, labels).numpy()

    def get_raw_model(self) -> torch.nn.Module:
        return self.generator


def _load_pyfunc(data_path: str) -> GeneratorModel:
    """MLflow's pyfunc loader hook: weights load with torch.load(weights_only=True) via load_generator."""
    generator, meta = load_generator(data_path)
    return GeneratorModel(generator, model_config(meta["model"]).classes())
