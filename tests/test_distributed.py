"""Training under torchrun (2 gloo processes on the CPU) takes the steps one process takes.

`resources.train.gpu: 2` makes `python -m cm train` run itself again under torchrun; each rank
computes its half of every global batch, with the draws of the whole batch (cm/distributed.py).
The two runs then differ only in the order of float sums: the batch mean is a mean of two half
means, and DistributedDataParallel averages the halves' gradients. That is a few ulps per step;
Adam's normalisation can magnify it where a gradient is near zero, so after 30 steps the weights
agree to 1e-4 (absolute, on weights of order 0.1) and not bit for bit. A mistake in the split (a
rank drawing its own noise, a rank's rows counted twice, OC's partners chosen within a rank, a
missing all-reduce) moves weights by 1e-2 or more.

cm+cbdm (CM's two passes and CBDM's batched y/y' pass), cm+oc (partners from the global batch)
and cm in the shared-encoder fast mode (DDPM's path under it, cm = cm+ddpm) cover every way a
method calls the network. The tiny preset has no dropout, whose masks a rank draws for its own rows.
"""

from __future__ import annotations

import signal
import time

import psutil
import pytest
import yaml

from cm import io
from tests.conftest import run
from tests.helpers import checkpoint_steps, same_weights, start, wait_for

pytestmark = pytest.mark.e2e


def write_params(project, name: str, *, gpu: int, passes: str = "two", **train) -> str:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["resources"]["train"]["gpu"] = gpu
    params["tracking"]["enabled"] = False
    params["method_params"]["cm"]["passes"] = passes
    params["experiments"]["digits_lt"]["train"].update(train)
    (project / name).write_text(yaml.safe_dump(params, sort_keys=False))
    return name


def train_cmd(params: str, method: str, out: str) -> list[str]:
    return ["python", "-m", "cm", "train", "--params", params, "--experiment", "digits_lt", "--method", method,
            "--seed", "0", "--manifest", "results/digits_lt/data/manifest.json", "--out", f"{out}/model.pt",
            "--history", f"{out}/history.csv", "--checkpoints", f"{out}/checkpoints"]


@pytest.fixture(scope="module")
def prepared(shared_project):
    run(["python", "-m", "cm", "prepare-data", "--experiment", "digits_lt",
         "--out", "results/digits_lt/data/manifest.json"], shared_project)
    return shared_project


RUNS = {"cm+cbdm": "two", "cm+oc": "two", "cm": "shared_encoder"}


@pytest.fixture(scope="module")
def trained(prepared):
    """Each method trained by one process and by two (resources.train.gpu: 2), 30 steps."""
    outputs = {}
    for method, passes in RUNS.items():
        out = f"ddp/{method}"
        run(train_cmd(write_params(prepared, f"one-{passes}.yaml", gpu=0, passes=passes), method, f"{out}/one"),
            prepared)
        two = run(train_cmd(write_params(prepared, f"two-{passes}.yaml", gpu=2, passes=passes), method,
                            f"{out}/two"), prepared)
        outputs[method] = (prepared / out, two.stderr)
    return outputs


def max_difference(a, b) -> float:
    sa, sb = io.load_torch(a), io.load_torch(b)
    return max((sa[part][k].float() - sb[part][k].float()).abs().max().item()
               for part in ("state_dict", "ema") for k in sa[part])


@pytest.mark.parametrize("method", RUNS)
def test_two_processes_take_the_steps_of_one(trained, method):
    out, log = trained[method]
    assert "'processes': 2" in log, log[-3000:]  # rank 0's summary line
    difference = max_difference(out / "one/model.pt", out / "two/model.pt")
    assert difference < 1e-4, f"2 processes vs 1: max |dw| = {difference:.2e}"
    one_history = (out / "one/history.csv").read_text().splitlines()
    two_history = (out / "two/history.csv").read_text().splitlines()
    assert one_history[0] == two_history[0] and len(one_history) == len(two_history) == 4  # 3 log steps
    for a, b in zip(one_history[1:], two_history[1:]):  # losses logged as the global batch's mean
        assert [float(v) for v in a.split(",")] == pytest.approx([float(v) for v in b.split(",")], rel=1e-4)


def test_a_batch_that_does_not_split_is_refused_before_any_process_starts(prepared):
    odd = write_params(prepared, "odd.yaml", gpu=2, batch_size=33)
    result = run(train_cmd(odd, "cm", "ddp/odd"), prepared, check=False)
    assert result.returncode == 2 and "torch.distributed" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("(each of the 2 training processes takes an equal "
                                                            "share of a batch)")
    assert not (prepared / "ddp/odd").exists()


def test_a_killed_two_process_run_resumes_to_the_same_weights(prepared, trained):
    target = "ddp/resume"
    proc = start(train_cmd("two-two.yaml", "cm+cbdm", target), prepared)
    wait_for(lambda: checkpoint_steps(prepared / target) or proc.poll() is not None, what="a checkpoint")
    time.sleep(0.3)
    family = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:  # a preempted node: torchrun and both ranks die at once
        try:
            psutil.Process(pid).send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    saved = checkpoint_steps(prepared / target)
    assert saved and saved[-1] < 30 and not (prepared / target / "model.pt").exists()
    again = run(train_cmd("two-two.yaml", "cm+cbdm", target), prepared)
    assert "resuming from" in again.stderr
    assert same_weights(prepared / target / "model.pt", trained["cm+cbdm"][0] / "two/model.pt")
