"""scripts/: shellcheck-clean, and their dry runs print exactly the cloud commands they would run."""

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or str(Path(__import__("sys").executable).parent / "shellcheck")
    files = sorted(str(p) for p in SCRIPTS.iterdir() if p.suffix in (".sh", ".sbatch"))
    result = subprocess.run([shellcheck, *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPTS / "tpu_vm.sh"), "--dry-run", *args], capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (("create", "vm", "us-central2-b"),
         "+ gcloud compute tpus tpu-vm create vm --zone=us-central2-b --accelerator-type=v4-8 "
         "--version=tpu-ubuntu2204-base"),
        (("create", "vm", "us-central2-b", "v4-32"), "--accelerator-type=v4-32"),
        (("install", "vm", "z", "https://example.org/vision-ft.git", "v1"),
         "--worker=all --command git\\ clone\\ --depth\\ 1\\ --branch\\ v1\\ https://example.org/vision-ft.git"),
        (("launch", "vm", "z", "--epochs", "3"), "--worker=all --command cd\\ vision-ft\\ \\&\\&\\ nohup\\ "
         ".venv/bin/vision-ft\\ fit\\ --no-progress\\ --epochs\\ 3\\ \\>\\ ~/vision-ft-fit.log"),
        (("logs", "vm", "z"), "--worker=0 --command tail\\ -n\\ +1\\ -f\\ ~/vision-ft-fit.log"),
        (("delete", "vm", "z"), "+ gcloud compute tpus tpu-vm delete vm --zone=z --quiet"),
    ],
)  # fmt: skip
def test_dry_run_prints_the_commands(args, expected):
    result = dry_run(*args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("+ gcloud compute tpus tpu-vm") and expected in lines[0]


def test_bad_usage_exits_2():
    assert dry_run("create", "vm").returncode == 2
    assert dry_run("reboot", "vm", "z").returncode == 2
    result = dry_run("install", "vm", "z")
    assert result.returncode != 0 and "GIT_URL" in result.stderr
