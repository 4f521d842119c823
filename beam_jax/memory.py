"""The memory this process may still take (no jax import, so the vLLM plugin reads it without it)."""

from __future__ import annotations


def available_memory_bytes() -> int | None:
    """/proc/meminfo's MemAvailable in bytes, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
