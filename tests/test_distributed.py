"""Under torchrun: two ranks of one node tuned at once (CPU, gloo, a DDP-wrapped model)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

JOB = Path(__file__).resolve().parent / "ddp_job.py"
pytestmark = pytest.mark.slow


def _torchrun(tmp_path, timeout=240, **env):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(JOB)]
    environment = {**os.environ, "AUTOLOAD_TEST_OUT": str(tmp_path), "OMP_NUM_THREADS": "1",
                   **env}
    began = time.monotonic()
    proc = subprocess.run(command, env=environment, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.monotonic() - began


def _leftovers():
    """Processes of the job still alive (a rank, or a loader worker of one), once those that
    are on their way out have had 10 s to go."""
    alive = [p for p in psutil.process_iter(["cmdline"])
             if str(JOB) in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid()]
    return psutil.wait_procs(alive, timeout=10)[1]


def test_both_ranks_get_one_answer_and_each_reads_its_own_shard_once_an_epoch(tmp_path):
    proc, _ = _torchrun(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["result"]["config"] == ranks[1]["result"]["config"]
    assert ranks[0]["result"]["samples_per_second"] == ranks[1]["result"]["samples_per_second"]
    assert all(r["sampler"] == "DistributedSampler" for r in ranks)
    for epoch in range(2):
        shards = [set(r["epochs"][epoch]) for r in ranks]
        assert all(len(r["epochs"][epoch]) == 96 for r in ranks)  # once each, no repeats
        assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(192))
    notes = " ".join(ranks[0]["result"]["notes"])
    assert "tuned for 2 ranks, 2 on this node" in notes
    assert max(t["config"]["num_workers"] for t in ranks[0]["result"]["trials"]) <= 4


def test_a_rank_that_dies_ends_the_others_cleanly_without_a_hang(tmp_path):
    proc, seconds = _torchrun(tmp_path, AUTOLOAD_TEST_DIE="1", AUTOLOAD_TEST_TIMEOUT="30")
    assert proc.returncode != 0
    assert seconds < 120, "the surviving rank should not wait out a long timeout"
    assert not (tmp_path / "rank0.json").exists()
    said = [line for line in proc.stderr.splitlines() if line.startswith("autoload: rank 0:")]
    assert len(said) == 1, proc.stderr[-3000:]  # the survivor ends with one line
    assert not _leftovers()


def test_a_rank_that_stops_answering_is_named_not_taken_for_a_faulty_configuration(tmp_path):
    proc, _ = _torchrun(tmp_path, AUTOLOAD_TEST_HANG="1", AUTOLOAD_TEST_TIMEOUT="8")
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if line.startswith("autoload: rank 0:")]
    assert len(said) == 1, proc.stderr[-3000:]
    assert "rank 1 stopped answering while tuning" in said[0], said[0]
    assert "deadline while the other ranks waited on it" in said[0]
    assert not _leftovers()


def test_the_ddp_example_trains_with_the_tuned_loader_under_torchrun():
    example = JOB.parent.parent / "examples" / "ddp_train.py"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(example), "--epochs", "1", "--tune-seconds", "6", "--samples", "512"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "samples/s for the job" in proc.stdout and "epoch 1: train loss" in proc.stdout


def test_one_job_as_two_nodes_agrees_plans_each_node_alone_and_keys_the_cache_by_the_world(
        tmp_path):
    """Two torchrun agents on this machine, one rank each, as two nodes of one job would run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shared = tmp_path / "shared-cache"
    environment = {**os.environ, "AUTOLOAD_TEST_OUT": str(tmp_path), "OMP_NUM_THREADS": "1",
                   "AUTOLOAD_TEST_TIMEOUT": "5", "AUTOLOAD_TEST_CACHE": str(shared)}
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
         f"--node-rank={k}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
         f"--rdzv-conf=is_host={int(k == 0)}", "--rdzv-id=two-nodes", str(JOB)],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k in range(2)]
    outputs = [agent.communicate(timeout=180) for agent in agents]
    for agent, (_, err) in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, err[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["result"] == ranks[1]["result"]  # one answer
    for r, rank in enumerate(ranks):  # each node holds one rank: its local world is its own
        assert rank["world"] == {"rank": r, "size": 2, "local_rank": 0, "local_size": 1}
    from autoload.space import usable_cpus

    notes = " ".join(ranks[0]["result"]["notes"])
    assert f"tuned for 2 ranks, 1 on this node: each rank's loader searched up to its share " \
           f"of the CPUs ({usable_cpus()})" in notes  # the node's CPUs, not half of them
    (entry,) = shared.glob("*.json")
    assert json.loads(entry.read_text())["cache"]["fingerprint"]["world"] == {
        "size": 2, "per_node": 1}
