"""The PyInstaller bundle's entry point (packaging/nri-seccomp.spec)."""

import multiprocessing
import sys

if __name__ == "__main__":
    # a frozen program is its own interpreter: the workers' fork server and its
    # children are started as this executable, and this call turns them into those
    multiprocessing.freeze_support()
    from nri_seccomp.cli import main

    sys.exit(main())
