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
         "--worker=all --command sudo\\ apt-get\\ update\\ -q\\ \\&\\&\\ sudo\\ apt-get\\ install\\ "
         "-y\\ -q\\ python3.11\\ python3.11-venv\\ \\&\\&\\ git\\ clone\\ --depth\\ 1\\ --branch\\ v1\\ "
         "https://example.org/vision-ft.git"),
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


def test_the_install_makes_its_venv_with_python_3_11():
    """Ubuntu 22.04 TPU images run Python 3.10, which pip refuses for vision-ft (>= 3.11)."""
    line = dry_run("install", "vm", "z", "https://example.org/vision-ft.git").stdout
    assert "python3.11\\ -m\\ venv\\ vision-ft/.venv" in line and "python3\\ -m\\ venv" not in line


def test_the_sbatch_script_requeues_a_job_that_checkpointed_at_sigterm(tmp_path):
    """A job exiting 75 at its time limit's SIGTERM ended FAILED: --requeue requeues after node
    failures and preemptions, not a job that exits by itself."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", "exit ${FAKE_RC}"), ("scontrol", 'echo "scontrol $*" >> "$LOG"')):
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    for rc, requeued in ((75, True), (0, False), (3, False)):
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_RC": str(rc), "LOG": str(log), "SLURM_JOB_ID": "42"}
        log.write_text("")
        script = [str(SCRIPTS / "slurm_fit.sbatch"), "c.yaml", "out"]
        result = subprocess.run(["bash", *script], env=env, capture_output=True, text=True)
        assert result.returncode == rc, result.stderr
        assert log.read_text() == ("scontrol requeue 42\n" if requeued else "")


def test_bad_usage_exits_2():
    assert dry_run("create", "vm").returncode == 2
    assert dry_run("reboot", "vm", "z").returncode == 2
    result = dry_run("install", "vm", "z")
    assert result.returncode != 0 and "GIT_URL" in result.stderr
