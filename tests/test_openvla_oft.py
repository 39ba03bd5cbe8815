"""The OpenVLA-OFT backend fails clearly where it cannot run (this CPU machine: no GPU, no openvla-oft)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from common.vla.openvla_oft import OpenVLAOFTUnavailable, check_requirements, load_openvla_oft
from tests.stream_helpers import REPO, env


def test_cpu_device_is_refused_with_a_clear_message():
    with pytest.raises(OpenVLAOFTUnavailable, match="CUDA GPU"):
        load_openvla_oft(device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_missing_gpu_is_named():
    with pytest.raises(OpenVLAOFTUnavailable, match="torch sees none"):
        check_requirements("cuda:0")


def test_producer_exits_with_the_reason(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "producer.produce", "--vla", "openvla-oft", "--endpoint", "tcp://127.0.0.1:1"],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "OpenVLAOFTUnavailable" in proc.stderr and "CUDA GPU" in proc.stderr
    assert "Traceback" not in proc.stderr  # a message, not a crash
