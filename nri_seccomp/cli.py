"""Console entry point: parse arguments, set up logging, wire the stub to the plugin."""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType

from nri_seccomp.bounded import BoundedFormatter
from nri_seccomp.lazy import LazySeccompPlugin
from nri_seccomp.logline import LineHandler, RotatingLineHandler
from nri_seccomp.nri import stub


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nri-seccomp",
        description="containerd NRI plugin: seccomp profiles from OCI artifacts "
        "(CRI-O's seccomp-profile annotations).",
    )
    p.add_argument("--config", help="YAML configuration file (external plugin); a "
                   "pre-installed plugin gets its configuration from the runtime")
    p.add_argument("--socket", help="dial this NRI socket (external plugin) instead of "
                   "using NRI_PLUGIN_SOCKET; default " + stub.DEFAULT_SOCKET_PATH)
    p.add_argument("--external", action="store_true",
                   help="run as an external plugin even if NRI_PLUGIN_SOCKET is set")
    p.add_argument("--name", help="plugin name (default: NRI_PLUGIN_NAME or file name)")
    p.add_argument("--idx", help="plugin index, two digits (default: NRI_PLUGIN_IDX or file name)")
    p.add_argument("--ready-file", metavar="PATH",
                   help="keep this file while the runtime consults the plugin: written "
                   "(time, runtime) once the runtime's Synchronize has been answered (from "
                   "then on containers get the plugin's adjustment), removed when the "
                   "connection ends (the probes' `test -f`)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-file", metavar="PATH",
                   help="log to this file instead of stderr, rotated at --log-file-bytes "
                   f"with {LOG_FILE_BACKUPS} old files kept (a pre-installed plugin's "
                   "stderr is not kept by containerd)")
    p.add_argument("--log-file-bytes", type=int, default=LOG_FILE_BYTES, metavar="N",
                   help="rotate the log file at this size (default %(default)s)")
    p.add_argument("--log-syslog", nargs="?", const=SYSLOG_SOCKET, metavar="SOCKET",
                   help="log to syslog/journald through this socket (default "
                   f"{SYSLOG_SOCKET}) instead of stderr")
    return p


#: the log file's rotation: at most (1 + backups) * bytes on disk
LOG_FILE_BYTES = 10 * 1024 * 1024
LOG_FILE_BACKUPS = 3
SYSLOG_SOCKET = "/dev/log"


def log_handler(args: argparse.Namespace) -> logging.Handler:
    """Where the log goes: a rotated file, syslog (journald reads /dev/log) or stderr.
    Each keeps the one-line, bounded format: registries and annotations reach it."""
    handler: logging.Handler
    if args.log_file:
        directory = os.path.dirname(os.path.abspath(args.log_file))
        os.makedirs(directory, mode=0o750, exist_ok=True)
        handler = RotatingLineHandler(
            args.log_file, max_bytes=max(args.log_file_bytes, 4096), backups=LOG_FILE_BACKUPS)
    elif args.log_syslog:
        handler = logging.handlers.SysLogHandler(
            address=args.log_syslog, facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
        # syslog adds its own time stamp; the ident lets journald name the program
        handler.ident = f"nri-seccomp[{os.getpid()}]: "
        handler.setFormatter(BoundedFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler = LineHandler(sys.stderr)
    return handler


def _stop_as_on_sigint(signum: int, frame: FrameType | None) -> None:
    # asyncio.run's SIGINT handler cancels the main task (then KeyboardInterrupt, which
    # run_plugin expects); outside asyncio.run, Python's default handler raises it. A
    # SIGINT ignored from the start (a background job of a shell) has neither.
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def main(
    argv: Sequence[str] | None = None,
    plugin_factory: Callable[[argparse.Namespace], object] | None = None,
) -> int:
    """Run a plugin object (by default the seccomp plugin) as NRI starts it, until EOF."""
    args = _parser().parse_args(argv)
    # a line per container decision at thousands a second: skip what the format never
    # shows (the Logging HOWTO's "Optimization": caller, thread and process lookups)
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # the HTTP library's own line per request would double ours and show URLs whole
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    # one line per record, bounded: registries and annotations reach these messages
    try:
        handler = log_handler(args)
        failed: OSError | None = None
    except OSError as exc:  # no syslog socket, an unwritable log directory: say so on stderr
        handler, failed = log_handler(argparse.Namespace(log_file=None, log_syslog=None)), exc
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), handlers=[handler])
    if failed is not None:
        logging.getLogger("nri_seccomp").error("cannot log where asked, logging to stderr: %s",
                                               failed)
    if plugin_factory is None:
        # registers at once; the seccomp plugin itself is imported at the first Configure
        plugin: object = LazySeccompPlugin(config_path=args.config)
    else:
        plugin = plugin_factory(args)
    # SIGTERM (a container's or a service's stop) ends the plugin as SIGINT does: the
    # serving task is cancelled, workers are stopped, the ready file is removed, exit 0.
    # Without a handler, the process as PID 1 of a container (the image) would ignore
    # it, and the kubelet would wait the whole grace period to SIGKILL it.
    signal.signal(signal.SIGTERM, _stop_as_on_sigint)
    socket_path = args.socket or (stub.DEFAULT_SOCKET_PATH if args.external else None)
    try:
        code = stub.run_plugin(
            plugin,
            argv=[sys.argv[0]],
            name=args.name or ("seccomp-oci" if socket_path else None),
            idx=args.idx or ("10" if socket_path else None),
            socket_path=socket_path,
            ready_file=args.ready_file,
        )
    except stub.StubError as exc:
        logging.getLogger("nri_seccomp").error("%s", exc)
        code = 1
    # The runtime is gone: fetches still running in worker threads serve nobody, and
    # the interpreter would wait for them at exit. Cache writes are atomic, so
    # leaving now loses nothing.
    _remove_multiprocessing_tempdir()
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)


def _remove_multiprocessing_tempdir() -> None:
    """multiprocessing's ``pymp-*`` directory (the fork server's socket) goes with the
    interpreter's exit handlers, which ``os._exit`` skips: in a container every restart
    would leave one behind. The worker pool is stopped by now."""
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is None:
        return
    # where multiprocessing.util.get_temp_dir() keeps it (set only once it was made)
    tempdir = mp_util.process.current_process()._config.get("tempdir")
    if tempdir:
        shutil.rmtree(tempdir, ignore_errors=True)
