"""launch/: every accelerate config parses, says how it is run, and is listed in launch/README.md."""

from __future__ import annotations

import subprocess

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from conftest import REPO

LAUNCH = REPO / "launch"
CONFIGS = sorted(LAUNCH.glob("*.yaml"))


def test_there_are_launch_configs():
    names = {path.stem for path in CONFIGS}
    assert {"cpu", "cpu_ddp", "single_gpu", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "multi_node"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_launch_config_parses_and_opens_with_its_command(path):
    config = load_config_from_file(str(path))
    assert config.compute_environment.value == "LOCAL_MACHINE"
    assert config.num_processes >= 1 and config.mixed_precision == "no"  # precision comes from the run config
    header = path.read_text().split("\ncompute_environment")[0]
    assert f"launch/{path.name}" in header or f"LAUNCH={path.stem}" in header


@pytest.mark.parametrize("path", CONFIGS + [LAUNCH / "slurm.sh"], ids=lambda p: p.name)
def test_launch_readme_gives_the_command_for_each_file(path):
    readme = (LAUNCH / "README.md").read_text()
    row = next((line for line in readme.splitlines() if line.startswith(f"| `{path.name}`")), None)
    assert row is not None, f"launch/README.md has no row for {path.name}"
    assert "accelerate launch" in row or "make train" in row or "sbatch" in row


def test_cpu_ddp_starts_two_processes_through_torchrun():
    config = load_config_from_file(str(LAUNCH / "cpu_ddp.yaml"))
    assert config.distributed_type.value == "MULTI_GPU" and config.num_processes == 2


def test_slurm_script_is_valid_bash_and_launches_on_every_node():
    script = LAUNCH / "slurm.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "srun" in text and "--machine_rank" in text and "--main_process_ip" in text
    assert "launch/multi_node.yaml" in text
