"""The isolation probe: run inside bubblewrap by `sandbox.isolation_problem` (as `python -I -c <this file's text>`,
since the project is not mounted there), it prints its uid, pid and number of open descriptors.

With `--drop-to UID` it first drops to that uid and gid, as the solver does when run by root.
"""

import os
import sys


def main(argv: list) -> None:
    """Drop to the uid given after `--drop-to` (if any), then print uid, pid and open descriptor count."""
    if len(argv) > 2:
        uid = int(argv[2])
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    print(os.getuid(), os.getpid(), len(os.listdir("/proc/self/fd")))


if __name__ == "__main__":
    main(sys.argv)
