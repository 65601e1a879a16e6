"""Distributed training with a tuned loader: every rank tunes at once, one answer for all.

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py [--epochs 2] [--tune-seconds 30]

Each rank builds the same DataLoader by hand; autoload.tune(), called on every rank, runs one
study on rank 0 and measures each trial on all ranks at once (each on its own shard, through the
DDP-wrapped model, so the all-reduce is part of the step), and returns the same result
everywhere. best_loader() then gives each rank a loader over its own shard.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synthetic_images import SyntheticImages, make_model  # noqa: E402

import autoload  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--tune-seconds", type=float, default=30)
    parser.add_argument("--samples", type=int, default=2048)
    args = parser.parse_args()

    dist.init_process_group("gloo")  # "nccl" with one GPU per rank
    rank = dist.get_rank()
    net = DistributedDataParallel(make_model())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    train_set = SyntheticImages(args.samples, seed=0)
    loader = DataLoader(train_set, batch_size=64, shuffle=True)  # the script's own

    result = autoload.tune(loader, model=net, optimizer=optimizer,
                           loss_fn=nn.functional.cross_entropy, timeout=args.tune_seconds)
    if rank == 0:
        print(f"autoload: {result.samples_per_second:,.0f} samples/s for the job with "
              f"{result.loader_kwargs}")
        for line in result.batch_size_advice():
            print(f"autoload: {line}")
    train_iter = autoload.best_loader(loader, result=result)  # this rank's shard

    for epoch in range(args.epochs):
        train_iter.sampler.set_epoch(epoch)
        total, count = 0.0, 0
        for x, y in train_iter:
            loss = nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(y), count + len(y)
        mean = torch.tensor([total, count])
        dist.all_reduce(mean)
        if rank == 0:
            print(f"epoch {epoch + 1}: train loss {mean[0] / mean[1]:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
