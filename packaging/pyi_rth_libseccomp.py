"""PyInstaller run-time hook: pyseccomp looks libseccomp up with ctypes.util.find_library,
which reads the system's ld cache (and runs ldconfig or gcc): on a node without
libseccomp, or in a root with no ldconfig, it finds nothing. Answer the bundled copy."""

import ctypes.util
import os
import sys

_bundled = os.path.join(getattr(sys, "_MEIPASS", ""), "libseccomp.so.2")
_system_find_library = ctypes.util.find_library


def _find_library(name: str) -> str | None:
    if name == "seccomp" and os.path.exists(_bundled):
        return _bundled
    if name == "c":
        # pyseccomp also loads the C library by name; the bundle runs on glibc
        return "libc.so.6"
    return _system_find_library(name)


ctypes.util.find_library = _find_library
