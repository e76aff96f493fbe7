"""Run a command under a seccomp allow-list, the way systemd applies a unit's
SystemCallFilter= with SystemCallErrorNumber=EPERM: python seccomp_exec.py SYSCALLS_FILE -- CMD.

A call outside the list fails with EPERM instead of running."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path

import pyseccomp


def main() -> None:
    names_file, separator, *command = sys.argv[1:]
    assert separator == "--" and command, __doc__
    allow = pyseccomp.SyscallFilter(defaction=pyseccomp.ERRNO(errno.EPERM))
    for name in Path(names_file).read_text().split():
        # systemd's groups name calls of every architecture; those of others do not resolve.
        with contextlib.suppress(OSError):
            allow.add_rule(pyseccomp.ALLOW, name)
    allow.load()
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
