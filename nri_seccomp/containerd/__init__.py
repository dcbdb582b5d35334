"""containerd's own gRPC API: the images the node pulled (``client``, ``platform``).

gRPC's fork handlers are turned off before grpc is first imported: this process
forks (the compile workers' fork server, subprocesses) while grpc's threads may be
busy, and a child never uses gRPC; with the handlers on, such a fork can leave the
child blocked before it execs. An operator's own setting wins.
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
