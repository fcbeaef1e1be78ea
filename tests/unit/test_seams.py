"""Clean seams: what production code imports, checked in a fresh interpreter."""

import subprocess
import sys

import pytest


def loaded_after(statement: str) -> set[str]:
    script = f"import sys\n{statement}\nprint('\\n'.join(sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


@pytest.mark.parametrize("module", ["worker.service", "worker.cli", "worker.dlq"])
def test_production_code_does_not_load_the_sandbox(module: str) -> None:
    loaded = loaded_after(f"import {module}")
    assert not {m for m in loaded if m.startswith(("worker.sandbox", "aiosmtpd"))}


def test_the_contract_does_not_load_the_broker() -> None:
    loaded = loaded_after("import worker.contract")
    assert not {m for m in loaded if m.startswith(("aio_pika", "aiormq", "worker.broker"))}
