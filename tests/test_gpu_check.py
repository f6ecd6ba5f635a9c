"""The GPU check kit (experiments/gpu_check.sh) stays runnable: its CPU rehearsal passes every step here, in
this environment (which has Hydra installed, so no .gpu_kit/ is needed)."""

import json
import subprocess

import pytest
from conftest import PROJECT_ROOT, user_environment

STEPS = "abcdefghij"


@pytest.mark.slow
def test_the_gpu_check_rehearsal_passes_every_step_on_the_cpu(tmp_path):
    environment = {**user_environment(), "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    environment.pop("GPU_CHECK_DEVICE", None)
    result = subprocess.run(
        ["bash", str(PROJECT_ROOT / "experiments" / "gpu_check.sh"), "--device", "cpu", "--small"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=900,
        cwd=tmp_path,  # the kit finds the checkout from its own path
    )
    summary = (tmp_path / "summary.txt").read_text() if (tmp_path / "summary.txt").exists() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:] + summary
    lines = [line for line in summary.splitlines() if line[:3] in {f"({step})" for step in STEPS}]
    assert [line[1] for line in lines] == list(STEPS) and all(" PASS " in line for line in lines), summary
    results = json.loads((tmp_path / "results.json").read_text())
    assert results, "results.json holds the steps' numbers"
