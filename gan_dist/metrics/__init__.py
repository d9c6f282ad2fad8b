"""Sample-quality metrics (FID, KID, IS, precision/recall) and the feature networks they use."""

from gan_dist.metrics.features import (
    ClassifierExtractor,
    FeatureExtractor,
    FIDInceptionV3,
    InceptionExtractor,
    build_extractor,
    train_classifier,
)
from gan_dist.metrics.fid import (
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)

__all__ = [
    "ClassifierExtractor",
    "FIDInceptionV3",
    "FeatureExtractor",
    "InceptionExtractor",
    "build_extractor",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "precision_recall",
    "train_classifier",
]
