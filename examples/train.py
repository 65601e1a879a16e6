"""A full training script shaped like the seed article's, with its DataLoader tuned by autoload.

    python examples/train.py                      # tune for 30 s, then train 3 epochs
    python examples/train.py --result r.json      # reuse `autoload tune ... --json r.json`

The parts: global settings; the model with `init_weights`, the loss and the optimizer; the Dataset
and the DataLoader (its kwargs from autoload); the training loop with AMP and `non_blocking`
copies; and `evaluate_loss`.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import trange

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synthetic_images import SyntheticImages, make_model  # noqa: E402

import autoload  # noqa: E402

# 1. Global settings ---------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--lr", type=float, default=0.01)
parser.add_argument("--tune-seconds", type=float, default=30)
parser.add_argument("--result", help="a result JSON from `autoload tune --json` to reuse")
parser.add_argument("--samples", type=int, default=4096)
parser.add_argument("--test-samples", type=int, default=1024)
args = parser.parse_args()

learning_rate = args.lr
batch_size = 64
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
num_epochs = args.epochs


# 2. Model, loss, optimizer --------------------------------------------------------------------
def init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)


net = make_model().to(device)
net.apply(init_weights)
criterion = nn.CrossEntropyLoss(reduction="none")
optimizer = torch.optim.SGD(net.parameters(), lr=learning_rate, momentum=0.9)

# 3. Data: the Dataset, and a DataLoader whose arguments autoload measured ----------------------
train_set = SyntheticImages(args.samples, seed=0)
test_set = SyntheticImages(args.test_samples, seed=1)
# The script's own loader, as written by hand; autoload keeps its shuffling and tunes the rest.
train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True)
if args.result:
    tuned = autoload.TuneResult.load(args.result)
else:
    tuned = autoload.tune(train_loader, model=net, optimizer=optimizer, device=device,
                          loss_fn=lambda out, y: criterion(out, y).mean(),
                          timeout=args.tune_seconds)
print(f"autoload: {tuned.samples_per_second:,.0f} samples/s with {tuned.loader_kwargs}, "
      f"amp={tuned.amp}; defaults gave {tuned.baselines.get('defaults', 0):,.0f}")
for line in tuned.batch_size_advice():
    print(f"autoload: {line}")
train_iter = autoload.best_loader(train_loader, result=tuned)
test_iter = autoload.DataLoader(test_set, shuffle=False, **tuned.loader_kwargs)
non_blocking = tuned.loader_kwargs["pin_memory"]
amp_dtype = None if tuned.amp is None else getattr(torch, tuned.amp)
scaler = torch.amp.GradScaler("cuda", enabled=tuned.amp == "float16" and device.type == "cuda")


def evaluate_loss(data_iter: DataLoader) -> float:
    """Mean loss over a data set."""
    net.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for X, y in data_iter:
            X, y = X.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = criterion(net(X), y)
            total += loss.float().sum().item()
            count += y.numel()
    net.train()
    return total / count


# 4. Training loop ------------------------------------------------------------------------------
for epoch in trange(num_epochs):
    net.train()
    for X, y in train_iter:
        X, y = X.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = criterion(net(X), y)
        optimizer.zero_grad()
        scaler.scale(loss.mean()).backward()
        scaler.step(optimizer)
        scaler.update()
    print(f"epoch {epoch + 1}: train loss {evaluate_loss(train_iter):.4f}, "
          f"test loss {evaluate_loss(test_iter):.4f}")
