import sys

from nri_seccomp.cli import main

# guarded: seccomp worker processes (multiprocessing forkserver) import the main
# module as __mp_main__, and must not start a second plugin
if __name__ == "__main__":
    sys.exit(main())
