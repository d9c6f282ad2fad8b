"""What every architecture shares: its config section's base, and the resolution rule of the conv nets.

Each architecture module declares a ``Config`` (its own ``model.*`` keys, with ``arch`` as the tag) and
``generator(cfg, resolution, channels)`` / ``discriminator(cfg, resolution, channels)`` builders; the
registry in ``gan_dist.models`` collects them and the job config validates ``model`` against it.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from gan_dist.schema import Section, combination_error


class ModelSection(Section):
    """Keys every architecture has. Subclasses add theirs and narrow ``arch`` to one literal."""

    arch: str
    z_dim: int = Field(100, ge=1, description="Latent size")
    conditional: bool = Field(False, description="Condition G and D on the dataset's class labels")
    num_classes: int | None = Field(
        None, ge=2, description="Classes of a conditional model; unset: the dataset manifest's class count"
    )

    def check_resolution(self, resolution: int) -> None:
        """Raise ValueError when the architecture cannot build nets for ``resolution``."""

    def classes(self) -> int:
        """Classes G and D are conditioned on (0: unconditional)."""
        return (self.num_classes or 0) if self.conditional else 0


def resolution_steps(resolution: int, lowest: int = 32, highest: int = 256) -> int:
    """Number of 2x steps from 4x4 up to ``resolution``; ValueError unless a power of two in lowest..highest."""
    if resolution & (resolution - 1) or not lowest <= resolution <= highest:
        raise ValueError(f"needs a power of two in {lowest}..{highest}, got {resolution}")
    return resolution.bit_length() - 3  # log2(R) - 2


class ClassicConfig(ModelSection):
    """Keys of the classic nets (mlp, dcgan, resnet): base widths and where normalisation goes."""

    class_through_batchnorm: ClassVar[bool] = False  # a conditional G needs g_batchnorm (dcgan, resnet)

    g_width: int = Field(64, ge=4, description="Base channel width of G (DCGAN/ResNet) or hidden size (MLP)")
    d_width: int = Field(64, ge=4, description="Base channel width of D (DCGAN/ResNet) or hidden size (MLP)")
    g_batchnorm: bool = True
    d_norm: Literal["batch", "none"] = "none"
    d_spectral_norm: bool = False

    @model_validator(mode="after")
    def _conditional_batchnorm(self) -> ClassicConfig:
        if self.conditional and self.class_through_batchnorm and not self.g_batchnorm:
            raise combination_error(
                "model.g_batchnorm",
                f"a conditional {self.arch} G takes the class through conditional BatchNorm; set model.g_batchnorm=true",
            )
        return self
