"""What other processes take of the CPUs: a reading from /proc/stat less the tuner's own tree."""

import subprocess
import sys
import time

import pytest

from autoload import cpuload
from autoload.cpuload import CpuReading, others_share


def test_the_others_share_is_the_machines_work_less_the_tuners_own():
    before = CpuReading(busy=100.0, own=40.0, cpus=2)
    after = CpuReading(busy=103.0, own=41.0, cpus=2)  # 3 CPU-s of work in 2 s, 1 of them ours
    assert others_share(before, after, seconds=2.0) == pytest.approx(0.5)
    # the tuner alone: nothing is the others'; clock ticks can make it a hair negative
    assert others_share(before, CpuReading(busy=101.0, own=41.02, cpus=2), 2.0) == 0.0
    assert others_share(before, CpuReading(busy=110.0, own=40.0, cpus=2), 2.0) == 1.0
    assert others_share(None, after, 2.0) is None
    assert others_share(before, after, 0.0) is None
    assert others_share(before, CpuReading(busy=103.0, own=41.0, cpus=4), 2.0) is None


@pytest.mark.machine_load
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_busy_process_outside_the_tuners_tree_is_read_as_the_others():
    # A shell starts the busy loop in the background and exits: the loop is reparented, so it
    # is no descendant of this process, as another user's job would not be.
    spin = "import time\nt = time.time()\nwhile time.time() - t < 3: pass\n"
    subprocess.run(["sh", "-c", f'"{sys.executable}" -c "$0" >/dev/null 2>&1 &', spin],
                   check=True)
    time.sleep(0.3)
    before, began = cpuload.read(), time.monotonic()
    time.sleep(1.0)
    share = others_share(before, cpuload.read(), time.monotonic() - began)
    assert share is not None and before is not None
    # One core of the machine's kept busy (more, if the machine is busy anyway).
    assert share >= 0.8 / before.cpus
