"""Whether a process of this host still runs: for cleaning up after dead ones."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True if *pid* exists here (even when owned by another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
