"""A two-rank job for tests/test_distributed.py, run by torchrun: a DDP-wrapped model tuned on
every rank at once, then each rank's tuned loader read for two epochs.

The test sets AUTOLOAD_TEST_OUT (a folder for each rank's JSON), AUTOLOAD_TEST_DIE (a rank
that exits mid-tuning, for the fault test), AUTOLOAD_TEST_HANG (a rank whose main process
stops in ``__getitem__`` mid-tuning) and AUTOLOAD_TEST_CACHE (a cache folder: the result is
remembered there; else nothing is cached).
"""

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import get_worker_info

sys.path.insert(0, str(Path(__file__).resolve().parent))

import autoload  # noqa: E402
import autoload.distributed  # noqa: E402
import autoload.errors  # noqa: E402

from toydata import Indexed  # noqa: E402


class DiesOnRank(Indexed):
    """Rank ``rank`` exits (as a crash would) at its ``after``-th item."""

    def __init__(self, n, rank, after):
        super().__init__(n)
        self.rank, self.after, self.seen = rank, after, 0

    def __getitem__(self, i):
        self.seen += 1
        if dist.get_rank() == self.rank and self.seen == self.after:
            os._exit(3)
        return super().__getitem__(i)


class HangsOnRank(Indexed):
    """Rank ``rank``'s main process stops answering (sleeps for good) from its ``after``-th item
    on; its workers, if any, go on."""

    def __init__(self, n, rank, after):
        super().__init__(n)
        self.rank, self.after, self.seen = rank, after, 0

    def __getitem__(self, i):
        if get_worker_info() is None and dist.get_rank() == self.rank:
            self.seen += 1
            while self.seen >= self.after:
                time.sleep(3600)
        return super().__getitem__(i)


def main() -> int:
    backend = os.environ.get("AUTOLOAD_TEST_BACKEND", "gloo")
    dist.init_process_group(backend)
    rank = dist.get_rank()
    device = torch.device("cpu")
    if backend == "nccl":  # one GPU per rank
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    out = Path(os.environ["AUTOLOAD_TEST_OUT"])
    die = os.environ.get("AUTOLOAD_TEST_DIE")
    hang = os.environ.get("AUTOLOAD_TEST_HANG")
    data = Indexed(192) if die is None else DiesOnRank(192, int(die), after=400)
    if hang is not None:
        data = HangsOnRank(192, int(hang), after=int(os.environ.get("AUTOLOAD_TEST_AFTER", 400)))
    torch.manual_seed(0)
    net = DistributedDataParallel(nn.Linear(4, 3).to(device))
    try:
        result = autoload.tune(data, model=net, loss_fn=nn.functional.cross_entropy,
                               timeout=float(os.environ.get("AUTOLOAD_TEST_TIMEOUT", 6)),
                               max_workers=2, final_rounds=2,
                               cache="AUTOLOAD_TEST_CACHE" in os.environ,
                               cache_dir=os.environ.get("AUTOLOAD_TEST_CACHE"))
    except (autoload.AutoloadError, KeyboardInterrupt) as exc:
        print(f"autoload: rank {rank}: {autoload.errors.summary(exc)}", file=sys.stderr,
              flush=True)
        return 1
    loader = autoload.best_loader(data, result=result)
    epochs = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        epochs.append(torch.cat([x[:, 0] for x, _ in loader]).long().tolist())
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"result": json.loads(result.to_json()), "epochs": epochs,
         "sampler": type(loader.sampler).__name__,
         "world": dataclasses.asdict(autoload.distributed.current_world())}))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
