"""More training processes than GPUs is a one-line configuration error before torchrun starts (fast
tests with CUDA faked by monkeypatching; the torchrun runs themselves are in test_distributed.py)."""

from __future__ import annotations

import pytest
import torch

from cm import distributed
from cm.errors import ConfigError


@pytest.fixture
def launches(monkeypatch):
    """Outside torchrun, with os.execv recorded instead of replacing the test process."""
    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(distributed.os, "execv", lambda exe, argv: calls.append(argv))
    return calls


def gpus(monkeypatch, count: int | None):
    """CUDA with `count` GPUs visible, or (None) no usable CUDA at all."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count is not None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count or 0)


def test_more_gpu_processes_than_gpus_stop_before_torchrun(monkeypatch, launches):
    gpus(monkeypatch, 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(ConfigError) as err:
        distributed.relaunch_under_torchrun(2)
    message = str(err.value)
    assert "\n" not in message and not launches
    assert message.startswith("resources.train.gpu = 2 is not allowed here: 1 GPU(s) are visible")
    assert "CUDA_VISIBLE_DEVICES='3'" in message and "at most 1" in message


def test_enough_gpus_or_the_cpu_start_torchrun(monkeypatch, launches):
    gpus(monkeypatch, 2)
    distributed.relaunch_under_torchrun(2)
    gpus(monkeypatch, None)  # no CUDA: device auto trains on the CPU, 2 gloo processes
    distributed.relaunch_under_torchrun(2)
    assert len(launches) == 2 and all("--nproc_per_node=2" in argv for argv in launches)
    distributed.relaunch_under_torchrun(2, device="cpu")
    assert len(launches) == 3


def test_device_cuda_without_cuda_and_one_process(monkeypatch, launches):
    gpus(monkeypatch, None)
    with pytest.raises(ConfigError, match=r"resources.train.gpu = 2 is not allowed here: 0 GPU\(s\) are visible"):
        distributed.relaunch_under_torchrun(2, device="cuda")
    distributed.relaunch_under_torchrun(1, device="cuda")  # one process: no torchrun, nothing to check
    assert not launches


def test_a_rank_without_a_gpu_is_a_config_error_not_an_invalid_ordinal(monkeypatch):
    gpus(monkeypatch, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: pytest.fail("set_device reached"))
    with pytest.raises(ConfigError, match=r"local rank 1, but 1 GPU\(s\) are visible: --nproc_per_node must be at "
                                          r"most 1"):
        distributed.init("cuda")


def test_the_train_stage_checks_with_params_device(monkeypatch, tmp_path):
    """`device: cpu` with resources.train.gpu: 2 means 2 gloo processes even where one GPU is visible:
    the train stage hands params.yaml's device to the GPU-count check."""
    import yaml

    from cm import cli
    from tests.conftest import ROOT

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["device"] = "cpu"
    params["resources"]["train"]["gpu"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    relaunches = []

    def relaunch(processes, device="auto"):
        relaunches.append((processes, device))
        raise SystemExit(0)  # where torchrun would take over

    monkeypatch.setattr(distributed, "relaunch_under_torchrun", relaunch)
    with pytest.raises(SystemExit):
        cli.main(["train", "--params", str(tmp_path / "params.yaml"), "--experiment", "digits_lt", "--method", "ddpm",
                  "--seed", "0", "--manifest", "m.json", "--out", str(tmp_path / "m.pt"), "--history",
                  str(tmp_path / "h.csv"), "--checkpoints", str(tmp_path / "ckpt")])
    assert relaunches == [(2, "cpu")]
