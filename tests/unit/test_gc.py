"""The collector as `ikw run` sets it up once started (bench/README, "The collector")."""

import subprocess
import sys


def test_start_up_objects_are_frozen_and_young_collections_are_rarer() -> None:
    # A fresh interpreter: this one's collector stays as pytest set it.
    script = (
        "import gc\n"
        "from worker.service import tune_gc\n"
        "default = gc.get_threshold()[0]\n"
        "tune_gc()\n"
        "print(default, gc.get_threshold()[0], gc.get_freeze_count())"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    default, young, frozen = map(int, done.stdout.split())
    assert young >= 50 * default
    assert frozen > 10_000  # the modules, models and templates loaded at start
