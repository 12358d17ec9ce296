"""User-input errors: one ``error:`` line naming the culprit, exit code 2, no traceback."""

from __future__ import annotations

import errno
import functools
import sys

import click


@functools.cache
def user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean "the user's input is wrong": a message, exit code 2, no traceback.

    Imported when a command fails, not with the command line: their modules bring JAX, and
    ``vision-ft --help`` or a mistyped option should answer at once."""
    from vision_ft.data.errors import DataError
    from vision_ft.infer.embeddings import EmbeddingFileError
    from vision_ft.models.registry import UnknownModelError
    from vision_ft.train.checkpoint import (
        CheckpointLocationError,
        CheckpointMismatchError,
        CheckpointUnreadableError,
    )
    from vision_ft.train.config import ConfigError
    from vision_ft.train.rules import RuleError
    from vision_ft.train.run_dir import RunDirError
    from vision_ft.weights.mapping import WeightLoadError
    from vision_ft.weights.sources import WeightSourceError

    return (
        WeightSourceError,
        WeightLoadError,
        UnknownModelError,
        ConfigError,
        DataError,
        RuleError,
        CheckpointMismatchError,
        CheckpointUnreadableError,
        CheckpointLocationError,
        EmbeddingFileError,
        RunDirError,
    )


def _is_jax_error(error: Exception) -> bool:
    jax = sys.modules.get("jax")  # no JAX error without JAX imported
    return jax is not None and isinstance(error, jax.errors.JaxRuntimeError)


class UserError(click.ClickException):
    exit_code = 2


# errors of a path itself (its name, its permissions, its kind), as opposed to the system's state
_REFUSED_PATH_ERRNOS = frozenset(
    {errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENOENT}
)


def user_errors_exit_2(command):
    """Turn the user-input errors raised below a command into one-line messages with exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except OSError as e:
            if e.filename is None or e.errno not in _REFUSED_PATH_ERRNOS:
                raise  # a full disk, an I/O error: not the input's fault
            # a path the user gave that the system refuses: too long a name, a folder without
            # permission, a file where a folder should be
            raise UserError(f"{e.filename}: {e.strerror or e}") from None
        except MemoryError as e:  # numpy's "Unable to allocate 37.3 GiB for an array ..."
            raise UserError(f"out of host memory: {e}; lower --batch-size or --img-size") from None
        except Exception as e:
            try:
                known = user_errors()
            except ImportError:  # a broken install: the error it caused, re-raised below, says more
                known = ()
            if isinstance(e, known):
                raise UserError(e.args[0] if e.args else str(e)) from None
            if _is_jax_error(e):
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                first_line = str(e).strip().splitlines()[0]
                raise UserError(
                    f"out of device memory: {first_line}; lower --batch-size or --img-size"
                ) from None
            if not isinstance(e, RuntimeError) or "home directory" not in str(e):
                raise
            # Path.expanduser() on "~name" where no user has that name, wherever a path is read
            given = [str(v) for v in click.get_current_context().params.values() if str(v).startswith("~")]
            raise UserError(
                f"{', '.join(given) or 'a path starting with ~'}: no such home directory here"
            ) from None

    return wrapper


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class OneLineErrors(click.Group):
    """Click's usage errors, too, become one ``error:`` line with exit code 2."""

    def main(self, *args, **kwargs):
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(130)  # the shell's code for a Ctrl-C
        except _NO_ARGS_IS_HELP as e:  # a bare `vision-ft`: the help, not an error message (click >= 8.2)
            click.echo(e.ctx.get_help(), err=True)
            sys.exit(2)
        except click.ClickException as e:
            hint = f" (see {e.ctx.command_path} --help)" if isinstance(e, click.UsageError) and e.ctx else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(2)
        sys.exit(result if isinstance(result, int) else 0)
