"""Real CUDA runs; skipped where torch sees no GPU (CI never has one)."""

import pytest
import torch
from torch import nn

import autoload
from autoload import LoaderConfig, MemoryCapExceeded, TrainingProbe, Window

from toydata import Indexed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_search_covers_pin_memory_and_fp16_with_grad_scaler():
    net = nn.Linear(4, 3).cuda()
    before = [p.detach().clone() for p in net.parameters()]
    result = autoload.tune(Indexed(256), model=net, loss_fn=nn.functional.cross_entropy,
                           timeout=15, max_workers=2)
    assert result.device.startswith("cuda")
    assert {t.config.pin_memory for t in result.trials} == {False, True}
    assert any(t.config.amp == "float16" for t in result.trials)
    assert result.winner.peak_gpu_bytes
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_gpu_memory_cap_makes_trials_infeasible():
    net = nn.Sequential(nn.Linear(4, 4096), nn.ReLU(), nn.Linear(4096, 3)).cuda()
    probe = TrainingProbe(Indexed(512), device=torch.device("cuda"), model=net,
                          loss_fn=nn.functional.cross_entropy, gpu_memory_cap=1 << 20)
    with pytest.raises(MemoryCapExceeded, match="GPU"):
        probe.measure(LoaderConfig(256, amp="float16"), Window(seconds=0.2))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_ranks_on_two_gpus_agree_with_nccl(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    job = Path(__file__).resolve().parent / "ddp_job.py"
    env = {**os.environ, "AUTOLOAD_TEST_OUT": str(tmp_path), "AUTOLOAD_TEST_BACKEND": "nccl"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(job)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["result"]["config"] == ranks[1]["result"]["config"]
