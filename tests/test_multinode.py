"""Multi-machine launchers run for real on one machine's CPU: launch/multi_node.yaml started twice (machine ranks 0
and 1 meeting at 127.0.0.1), and launch/slurm.sh under stand-in `srun` and `scontrol`, each train and save one model
equal to a 2-process launch/cpu_ddp.yaml run with the same global batch; launch/fsdp.yaml and (where DeepSpeed is
installed) launch/deepspeed_zero{2,3}.yaml on 2 CPU processes save one model that AutoModelForCausalLM loads.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, accelerate_launch_cmd, python_env, tiny_cli

LAUNCH = REPO / "launch"
STEPS = 3
TIMEOUT = 300
# The same run under every launcher: 2 processes x 4 rows a step.
RUN = dict(max_steps=STEPS, per_device_train_batch_size=4, learning_rate=3e-3, seed=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """A launcher in a process group of its own, so that a timeout ends its torchrun agent and workers too."""
    return subprocess.Popen(command, cwd=REPO, env=env or python_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(processes: list[subprocess.Popen]) -> None:
    """Waits for every launcher; each must exit 0."""
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIMEOUT)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-4000:]


def assert_same_weights(out: Path, reference: Path) -> None:
    got, want = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == STEPS


@pytest.fixture(scope="module")
def ddp_model(tmp_path_factory, small_txt) -> Path:
    """The reference: launch/cpu_ddp.yaml, 2 processes on one machine."""
    out = tmp_path_factory.mktemp("cpu_ddp") / "out"
    finish([start([*accelerate_launch_cmd(), "--config_file", str(LAUNCH / "cpu_ddp.yaml"),
                   "--main_process_port", str(free_port()), "tsg/train.py", *tiny_cli(small_txt, out, **RUN)])])
    return out


def test_two_machine_ranks_meeting_at_localhost_train_the_ddp_model(tmp_path, small_txt, ddp_model):
    out, port = tmp_path / "out", free_port()
    launchers = [
        start([*accelerate_launch_cmd(), "--config_file", str(LAUNCH / "multi_node.yaml"), "--num_machines", "2",
               "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), "tsg/train.py", *tiny_cli(small_txt, out, **RUN)])
        for rank in (0, 1)
    ]
    finish(launchers)
    assert_same_weights(out, ddp_model)


def typed(value: str):
    """A command-line word as the JSON value it stands for (3, 0.003, true), else the string."""
    try:
        return json.loads(value)
    except ValueError:
        return value


SRUN = """#!/bin/bash
# Stand-in srun: the command once per node of a 2-node allocation, in parallel.
pids=()
for node in 0 1; do
  SLURM_NODEID=$node SLURM_NNODES=2 SLURM_PROCID=$node "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""

SCONTROL = """#!/bin/bash
# Stand-in scontrol: both nodes of the allocation are this machine.
[ "$1 $2" = "show hostnames" ] && printf '127.0.0.1\\nlocalhost\\n'
"""


def test_slurm_script_on_a_machine_without_gpus_trains_the_ddp_model(tmp_path, small_txt, ddp_model):
    """The script unedited: no nvidia-smi (1 CPU process per node, --use_cpu added), MAIN_PORT from the environment.

    The run config does not say use_cpu, so the script has to.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    if shutil.which("nvidia-smi"):  # a GPU machine: its nvidia-smi answers as on a node without a driver
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    out = tmp_path / "out"
    words = tiny_cli(small_txt, out, use_cpu=None, **{**RUN, "max_steps": 50})
    config = tmp_path / "run.json"
    config.write_text(json.dumps({key[2:]: typed(value) for key, value in zip(words[::2], words[1::2])}))
    env = {k: v for k, v in python_env().items() if not k.startswith(("SLURM_", "GPUS_PER_NODE", "ACCELERATE"))}
    # The stand-ins first; then this interpreter's environment, for `accelerate` when there is no .venv.
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(SLURM_JOB_NODELIST="node[1-2]", MAIN_PORT=str(free_port()))
    # The words after the run config reach every node's run (max_steps 50 in the file, 3 on the command line).
    finish([start(["bash", str(LAUNCH / "slurm.sh"), str(config), "--max_steps", str(STEPS)], env)])
    assert_same_weights(out, ddp_model)


def test_fsdp_config_on_two_cpu_processes_saves_one_loadable_model(tmp_path, small_txt, ddp_model):
    """launch/fsdp.yaml on a machine without a GPU: one model.safetensors that AutoModelForCausalLM loads, with the
    DDP run's weights (accelerate runs an FSDP config on the CPU as DDP over gloo; see launch/README.md)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    finish([start([*accelerate_launch_cmd(), "--config_file", str(LAUNCH / "fsdp.yaml"), "--num_processes", "2",
                   "--main_process_port", str(free_port()), "tsg/train.py", *tiny_cli(small_txt, out, **RUN)])])
    assert not list(out.glob("pytorch_model_fsdp*"))  # no sharded files in place of the model
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.num_parameters() == AutoModelForCausalLM.from_pretrained(ddp_model).num_parameters()
    assert_same_weights(out, ddp_model)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_config_on_two_cpu_processes_saves_one_loadable_model(tmp_path, small_txt, ddp_model, stage):
    """launch/deepspeed_zero{2,3}.yaml on 2 CPU processes (DeepSpeed's CPU accelerator; its first run compiles a
    communication op, minutes): one model that AutoModelForCausalLM loads whole. ZeRO-2 trains the DDP run's
    weights; ZeRO-3 builds the model partitioned (zero3_init_flag), so it starts from other random weights."""
    pytest.importorskip("deepspeed", reason="launch/deepspeed_*.yaml need `pip install deepspeed`")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    finish([start([*accelerate_launch_cmd(), "--config_file", str(LAUNCH / f"deepspeed_zero{stage}.yaml"),
                   "--num_processes", "2", "--main_process_port", str(free_port()), "tsg/train.py",
                   *tiny_cli(small_txt, out, **RUN)])])
    model = AutoModelForCausalLM.from_pretrained(out).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(ddp_model).state_dict()
    assert model.keys() == reference.keys()
    assert all(model[name].shape == reference[name].shape for name in reference)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == STEPS
    if stage == 2:
        for name in reference:
            torch.testing.assert_close(model[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
