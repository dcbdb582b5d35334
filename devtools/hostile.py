"""What the security review attacked with, shared by the attack tests and the benchmarks."""

from __future__ import annotations

import json
import os
from pathlib import Path


def compile_bomb(seed: int) -> bytes:
    """1.2 KB that kept libseccomp busy for 123 s of CPU: four rules on one syscall with
    six ``SCMP_CMP_GT`` conditions each (``seed`` makes the digest unique)."""
    rules = [{"names": ["read"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1 + r,
              "args": [{"index": i, "value": seed * 1000 + 97 * r + 13 * i, "op": "SCMP_CMP_GT"}
                       for i in range(6)]}
             for r in range(4)]
    return json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules}).encode()


def cpu_seconds(pid: int) -> float:
    """CPU used by a process and all its children, living and reaped (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            # every thread's children: a child started from a worker thread (the compile
            # workers' fork server is) is not listed under the main thread
            children = [c for task in Path(f"/proc/{p}/task").iterdir()
                        for c in (task / "children").read_text().split()]
        except OSError:
            continue
        # utime, stime, cutime, cstime: fields 14-17 of stat (here counted after the name)
        total += sum(int(x) for x in fields[11:15]) / tick
        todo += [int(c) for c in children]
    return total
