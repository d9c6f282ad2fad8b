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


def bare_loop(images: torch.Tensor, steps: int, window: int, threads: int, seed: int = 0) -> dict:
    from gan_dist.config import load_config
    from gan_dist.models import build_discriminator, build_generator

    torch.set_num_threads(threads)  # what Ray gives a worker with cpus_per_worker=threads (OMP_NUM_THREADS)
    cfg = load_config(QUICKSTART, ["data.url=/unused"])
    batch, z_dim = cfg.train.batch_size, cfg.model.z_dim
    torch.manual_seed(seed)
    net_g = build_generator(cfg.model, cfg.data.resolution, cfg.data.channels)
    net_d = build_discriminator(cfg.model, cfg.data.resolution, cfg.data.channels)
    opt_g = torch.optim.Adam(net_g.parameters(), lr=cfg.optim.g_lr, betas=cfg.optim.betas)
    opt_d = torch.optim.Adam(net_d.parameters(), lr=cfg.optim.d_lr, betas=cfg.optim.betas)
    ones, zeros = torch.ones(batch), torch.zeros(batch)

    order = torch.randperm(len(images))
    cursor, g_losses, d_losses = 0, [], []
    history: list[tuple[int, float]] = []
    stamps: list[float] = []
    cpu: list[float] = []  # CPU seconds of this process (all threads) at each stamp
    window_start = time.perf_counter()
    for step in range(1, steps + 1):
        if cursor + batch > len(order):  # a new epoch: reshuffle, drop the last partial batch
            order, cursor = torch.randperm(len(images)), 0
        real = images[order[cursor : cursor + batch]].float().div_(127.5).sub_(1.0)
        cursor += batch

        net_d.zero_grad()
        err_d_real = F.binary_cross_entropy_with_logits(net_d(real), ones)
        err_d_real.backward()
        fake = net_g(torch.randn(batch, z_dim))
        err_d_fake = F.binary_cross_entropy_with_logits(net_d(fake.detach()), zeros)
        err_d_fake.backward()
        opt_d.step()

        net_g.zero_grad()
        err_g = F.binary_cross_entropy_with_logits(net_d(fake), ones)
        err_g.backward()
        opt_g.step()
        g_losses.append(err_g.item())
        d_losses.append((err_d_real + err_d_fake).item())
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        if step % window == 0:
            history.append((step, window * batch / (stamps[-1] - window_start)))
            window_start = time.perf_counter()
    return {
        "images_per_sec": steady_images_per_sec(history, batch),
        "images_per_sec_history": history,
        "stamps": stamps,
        "clock": [stamps[0] + time.time() - time.perf_counter(), time.time()],  # wall clock: first, last step
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "final_losses": {"d": d_losses[-1], "g": g_losses[-1]},
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
