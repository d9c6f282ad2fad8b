"""Mode coverage: how many of a dataset's classes a generator produces, and how far its class histogram is from
the data's (the StackedMNIST measure of Metz et al. 2017, used by VEEGAN, PacGAN and R3GAN).

A classifier names the mode (class) of each generated image; with the data's class counts this gives

- ``modes``: the number of classes predicted at least once;
- ``mode_kl``: KL(p_fake ‖ p_data) in nats, p_fake the histogram of the predicted modes.

**The data histogram is the manifest's class counts** (the labels of every training image), not the
classifier's predictions on real images: those would be a second, noisy estimate from ``eval.num_images``
images (2,000 images over StackedMNIST's 1,000 modes leave ~13% of the bins empty, so the KL would jump with
the sample), would need another pass over the real data, and the counts are exact. The classifier's own errors
then count against the generator; on real StackedMNIST they cost ~0.01 nats (tests/test_modes.py).

**Empty bins**: the sum runs over p_fake's support (a mode the generator never produces adds 0, as 0·log 0 = 0;
missing modes show in ``modes``). A class with no data but predicted fakes would make the KL infinite: such a
class counts as half a sample (the Jeffreys pseudo-count), a large but finite penalty; the other classes'
counts are used as they are.

**Sample size**: with N fakes from the data distribution itself, the KL is not 0 but ≈ (K−1)/(2N) for K
modes (2N·KL is asymptotically χ² with K−1 degrees of freedom: 0.05 for 1,000 modes and N = 10,000), and a
perfect generator covers K·(1−(1−1/K)^N) modes in expectation (865 of 1,000 for N = 2,000, 993 for 5,000).
Compare numbers measured with the same N.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

EMPTY_CLASS_COUNT = 0.5  # pseudo-count of a class without data samples (see above)


def mode_metrics(predicted: torch.Tensor, data_counts: Sequence[int]) -> dict[str, float]:
    """``{"modes", "mode_kl"}`` of fakes whose predicted classes are ``predicted`` (``[N]`` ints), against the
    data's samples per class ``data_counts`` (the manifest's ``class_counts``)."""
    num_modes = len(data_counts)
    if predicted.numel() == 0:
        raise ValueError("mode metrics need at least one generated image")
    if int(predicted.min()) < 0 or int(predicted.max()) >= num_modes:
        raise ValueError(f"predicted classes must be in 0..{num_modes - 1}, got {int(predicted.min())}.."
                         f"{int(predicted.max())}: the classifier does not match the dataset's classes")
    fake = torch.bincount(predicted.flatten().cpu(), minlength=num_modes).double()
    data = torch.tensor(data_counts, dtype=torch.float64).clamp_min(EMPTY_CLASS_COUNT)
    p_fake, p_data = fake / fake.sum(), data / data.sum()
    support = fake > 0
    kl = (p_fake[support] * (p_fake[support] / p_data[support]).log()).sum()
    return {"modes": float(support.sum()), "mode_kl": float(kl)}
