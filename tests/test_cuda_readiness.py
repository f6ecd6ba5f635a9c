"""CUDA paths made right without a GPU, where a CPU can show it."""

import subprocess
import sys

import pytest
from conftest import PROJECT_ROOT, user_environment

SHOW = "import ddpm, os; print(os.environ['CUBLAS_WORKSPACE_CONFIG'])"


@pytest.mark.parametrize("users", [None, ":16:8"], ids=["unset", "set-by-the-user"])
def test_importing_ddpm_sets_the_cublas_workspace_before_cuda_can_start_unless_the_user_did(users):
    """cuBLAS reads CUBLAS_WORKSPACE_CONFIG once, at its first call: set only when a job asks for deterministic
    kernels, it came too late for the second job of an in-process sweep."""
    environment = {k: v for k, v in user_environment().items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    if users:
        environment["CUBLAS_WORKSPACE_CONFIG"] = users
    shown = subprocess.run(
        [sys.executable, "-c", SHOW], capture_output=True, text=True, env=environment, cwd=PROJECT_ROOT, check=True
    ).stdout.strip()
    assert shown == (users or ":4096:8")
