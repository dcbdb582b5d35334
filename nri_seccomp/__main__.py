import sys

from nri_seccomp.cli import main

sys.exit(main())
