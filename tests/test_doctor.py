"""ceprompt doctor (verbs/doctor.py) on installations that are broken: it must say what is wrong, not die."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_doctor_reports_torch_and_torchvision_that_do_not_match(tmp_path: Path) -> None:
    """A torchvision built for another torch fails at import with "operator torchvision::nms does not exist" (pip
    falling back to a local torch beside a CUDA torchvision): 0.3.0's doctor died with that traceback."""
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "ceprompt", "doctor"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout
    line = next(l for l in proc.stdout.splitlines() if l.strip().startswith("torchvision ") and "FAILED" in l)
    assert "do not match" in line and "versions:" in proc.stdout and "optional extras:" in proc.stdout
    assert "skipped until the packages above import" in proc.stdout
