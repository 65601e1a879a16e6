"""The examples keep working: the training script tunes, then trains for real."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_training_script_tunes_then_trains():
    # 8 s: beside two busy processes, 4 s ran out before the final could re-measure this CNN.
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "train.py"), "--epochs", "1", "--tune-seconds", "8",
         "--samples", "256", "--test-samples", "128"],
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "autoload:" in done.stdout and "epoch 1: train loss" in done.stdout
