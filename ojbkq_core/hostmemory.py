"""Host memory as Linux reports it: this process's resident and peak memory, and what the host has available."""
from __future__ import annotations


def _proc_bytes(path: str, key: str) -> int:
    """The `key:` line of a /proc file that counts kB, in bytes; 0 where the system does not say."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def host_memory_bytes(key: str = "VmRSS") -> int:
    """This process's host memory (/proc/self/status): `VmRSS` resident now, `VmHWM` its peak; 0 where
    the system does not say."""
    return _proc_bytes("/proc/self/status", key)


def available_memory() -> int:
    """The host memory available now (/proc/meminfo's `MemAvailable`); 0 where the system does not say."""
    return _proc_bytes("/proc/meminfo", "MemAvailable")
