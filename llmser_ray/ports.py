"""TCP ports picked ahead of the process that binds them, without racing that process's neighbours.

Binding port 0 and releasing it hands back a port from the kernel's *ephemeral* range
(``net.ipv4.ip_local_port_range``, 32768-60999 on Linux), the same range every outgoing
connection draws its local port from. A local Ray opens hundreds of loopback connections
between picking a port and the process that binds it starting, so such a port is taken by one of
them now and then, and the start fails at random. Ports picked here lie outside that range and
outside the fixed ranges Ray and Serve bind themselves, so only a process that asks for that
exact port can take it; callers still recheck and retry (``serving.start_local_serve``).

It imports nothing heavy: tests, benchmarks and the HAProxy path use it.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Where no range is published (macOS, Windows), the IANA dynamic range those systems use.
_IANA_EPHEMERAL = (49152, 65535)
# Ranges Ray and Serve bind by number: Ray's worker ports (10002-19999 by default), Serve's
# direct-ingress replica HTTP and gRPC ports (30000-31000, 40000-41000). Below 20000 also sit
# most well-known services (8000, 8265, 6379, ...).
_AVOID = ((0, 19999), (30000, 31000), (40000, 41000))


def ephemeral_range(path: Path = _RANGE_FILE) -> tuple[int, int]:
    """The kernel's ephemeral port range (inclusive), from ``path`` where the platform has one."""
    try:
        lo, hi = (int(x) for x in path.read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return _IANA_EPHEMERAL


def candidate_ports(ephemeral: tuple[int, int] | None = None) -> list[range]:
    """Port ranges outside the ephemeral range and ``_AVOID``, in ascending order."""
    lo, hi = ephemeral or ephemeral_range()
    blocked = sorted([*_AVOID, (lo, hi)])
    out, start = [], 0
    for b_lo, b_hi in blocked:
        if b_lo > start:
            out.append(range(start, b_lo))
        start = max(start, b_hi + 1)
    if start <= 65535:
        out.append(range(start, 65536))
    return [r for r in out if len(r)]


def tcp_socket(host: str) -> socket.socket:
    return socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)


def port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now (SO_REUSEADDR, as servers bind: TIME_WAIT is free)."""
    with tcp_socket(host) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(host: str = "127.0.0.1", rng: random.Random | None = None, tries: int = 200) -> int:
    """A port free on ``host`` now, outside the ephemeral range (see the module docstring).

    Random rather than the first free one, so that several processes picking at once rarely
    choose alike; each choice is checked by binding it.
    """
    rng = rng or random.SystemRandom()
    ranges = candidate_ports()
    weights = [len(r) for r in ranges]
    for _ in range(tries):
        port = rng.choice(rng.choices(ranges, weights)[0])
        if port_free(host, port):
            return port
    raise OSError(f"no free TCP port on {host} outside the ephemeral range after {tries} tries")
