"""The baseline of the overhead benchmark: a bare single-process PyTorch DCGAN loop, no Ray, no DDP.

It is the PyTorch DCGAN tutorial's loop (D on a real batch, D on G(z).detach(), one optimizer step, then G
through D with "real" labels; the loss values read with .item() every iteration as the tutorial does) on
gan_dist's own G and D (``build_generator``/``build_discriminator`` from the quickstart's model config),
the same Adam settings, the same loss (non-saturating: BCE-with-logits, D outputs logits) and the same
images, held in memory as one uint8 tensor, so no data loading is timed.

Throughput is measured exactly as gan_dist's trainer reports it: images/s per window of ``--window``
steps, the first window (warm-up) excluded. Prints one JSON object.

    python bench/bare_loop.py --shards DIR --steps 120 --window 20 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import QUICKSTART, load, load_images, prepare_digits, scratch, steady_images_per_sec


class TutorialStep:
    """One iteration of the PyTorch DCGAN tutorial's loop on the quickstart's G and D; call with a real batch
    (float in [-1, 1]). Reused by profile_step.py as its baseline."""

    def __init__(self, seed: int = 0) -> None:
        from gan_dist.config import load_config
        from gan_dist.models import build_discriminator, build_generator

        cfg = load_config(QUICKSTART, ["data.url=/unused"])
        self.batch, self.z_dim = cfg.train.batch_size, cfg.model.z_dim
        torch.manual_seed(seed)
        self.net_g = build_generator(cfg.model, cfg.data.resolution, cfg.data.channels)
        self.net_d = build_discriminator(cfg.model, cfg.data.resolution, cfg.data.channels)
        self.opt_g = torch.optim.Adam(self.net_g.parameters(), lr=cfg.optim.g_lr, betas=cfg.optim.betas)
        self.opt_d = torch.optim.Adam(self.net_d.parameters(), lr=cfg.optim.d_lr, betas=cfg.optim.betas)
        self.ones, self.zeros = torch.ones(self.batch), torch.zeros(self.batch)
        self.g_losses: list[float] = []
        self.d_losses: list[float] = []

    def __call__(self, real: torch.Tensor) -> None:
        self.net_d.zero_grad()
        err_d_real = F.binary_cross_entropy_with_logits(self.net_d(real), self.ones)
        err_d_real.backward()
        fake = self.net_g(torch.randn(self.batch, self.z_dim))
        err_d_fake = F.binary_cross_entropy_with_logits(self.net_d(fake.detach()), self.zeros)
        err_d_fake.backward()
        self.opt_d.step()

        self.net_g.zero_grad()
        err_g = F.binary_cross_entropy_with_logits(self.net_d(fake), self.ones)
        err_g.backward()
        self.opt_g.step()
        self.g_losses.append(err_g.item())
        self.d_losses.append((err_d_real + err_d_fake).item())


class MemoryBatches:
    """Endless shuffled batches (float in [-1, 1]) from an in-memory uint8 tensor, epoch by epoch."""

    def __init__(self, images: torch.Tensor, batch: int) -> None:
        self.images, self.batch = images, batch
        self.order, self.cursor = torch.randperm(len(images)), 0

    def __next__(self) -> torch.Tensor:
        if self.cursor + self.batch > len(self.order):  # a new epoch: reshuffle, drop the last partial batch
            self.order, self.cursor = torch.randperm(len(self.images)), 0
        idx = self.order[self.cursor : self.cursor + self.batch]
        self.cursor += self.batch
        return self.images[idx].float().div_(127.5).sub_(1.0)  # as gan_dist's to_float


def bare_loop(images: torch.Tensor, steps: int, window: int, threads: int, seed: int = 0) -> dict:
    torch.set_num_threads(threads)  # what Ray gives a worker with cpus_per_worker=threads (OMP_NUM_THREADS)
    step_fn = TutorialStep(seed)
    data = MemoryBatches(images, step_fn.batch)
    history: list[tuple[int, float]] = []
    stamps: list[float] = []
    cpu: list[float] = []  # CPU seconds of this process (all threads) at each stamp
    window_start = time.perf_counter()
    for step in range(1, steps + 1):
        step_fn(next(data))
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        if step % window == 0:
            history.append((step, window * step_fn.batch / (stamps[-1] - window_start)))
            window_start = time.perf_counter()
    return {
        "images_per_sec": steady_images_per_sec(history, step_fn.batch),
        "images_per_sec_history": history,
        "stamps": stamps,
        "clock": [stamps[0] + time.time() - time.perf_counter(), time.time()],  # wall clock: first, last step
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "final_losses": {"d": step_fn.d_losses[-1], "g": step_fn.g_losses[-1]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, help="prepared digits (default: prepare them in a temp dir)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--window", type=int, default=20, help="steps per throughput window (= train.log_every)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    before = load()
    with scratch() as tmp:
        images = load_images(args.shards or prepare_digits(Path(tmp)))
    result = bare_loop(images, args.steps, args.window, args.threads)
    print(json.dumps({**result, "images": len(images), "load_before": before, "load_after": load()}))


if __name__ == "__main__":
    main()
