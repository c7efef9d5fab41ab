"""The ``onnxq`` click group: every error as one ``error:`` line, with an exit code."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import click

from onnxq import io
from onnxq.errors import EXIT_FAILED, EXIT_USAGE, OnnxqError

__all__ = ["OnnxqGroup", "main"]


class OnnxqGroup(click.Group):
    """A click group that reports onnxq, click and unexpected errors as one line each."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OnnxqError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            _fail(str(e), e.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BrokenPipeError:
            # ``onnxq passes | head -1``: the reader left; handled in `main`.
            raise
        except Exception as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            _fail(f"{type(e).__name__}: {e} (run with --debug for the traceback)", EXIT_USAGE)

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Runs the CLI; click's own errors (usage, files) are shown as one line too."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            with _terminate_as_exception():
                rv = super().main(args, prog_name, complete_var, False, **extra)
        except Terminated as e:
            _fail(f"terminated by {e.signal_name}; partial files removed", 128 + e.signum)
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            _fail(e.format_message().rstrip(".") + hint, e.exit_code)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        except click.Abort as e:
            if isinstance(e.__cause__, KeyboardInterrupt):  # click's wrapping of Ctrl-C
                _fail("interrupted by SIGINT; partial files removed", 128 + signal.SIGINT)
            _fail("aborted", EXIT_FAILED)
        except BrokenPipeError:
            _quiet_broken_pipe()
        sys.exit(rv if isinstance(rv, int) else 0)


class Terminated(BaseException):
    """SIGTERM, raised where the main thread is, so ``finally`` blocks clean up.

    A BaseException, as KeyboardInterrupt is: ``except Exception`` must not swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name


@contextlib.contextmanager
def _terminate_as_exception() -> Iterator[None]:
    """Turns SIGTERM into `Terminated` during the run; removes temporary files at the end.

    SIGINT already raises KeyboardInterrupt. The writers' ``finally`` blocks delete their
    temporary files as either exception passes; `io.remove_pending_temps` catches those
    an interrupt reached in between.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def raise_terminated(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        # No second signal may cut the clean-up short.
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            io.remove_pending_temps()
        finally:
            # None: a handler set outside Python, which cannot be put back; use the default.
            signal.signal(signal.SIGINT, signal.SIG_DFL if interrupt is None else interrupt)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _fail(message: str, exit_code: int) -> None:
    """Prints ``error: MESSAGE`` as one line on stderr and exits."""
    click.echo("error: " + " ".join(message.split()), err=True)
    sys.exit(exit_code)


def _quiet_broken_pipe() -> None:
    """Exits without a traceback when stdout's reader has gone, as Unix tools do."""
    # Python flushes stdout again at exit, which would print "Exception ignored ...":
    # point stdout at /dev/null first (the recipe of Python's signal docs).
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (e.g. click's test runner)
        pass
    sys.exit(EXIT_FAILED)


@click.group(
    cls=OnnxqGroup,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("-v", "--verbose", is_flag=True, help="Show progress logs.")
@click.version_option(package_name="onnxq")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """onnxq: compile ONNX models to fast, accurate int8 for ONNX Runtime."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
