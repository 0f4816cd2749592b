"""The local Ray that every command starts keeps its ports on this machine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Starts a local Ray as the commands do (init_ray), runs a task so a worker exists, and lists the
# listening TCP sockets of this process and every process it started (GCS, raylet, dashboard,
# agents, workers).
PROBE = """
import json, os, sys
import psutil, ray
from ray._private import ray_constants
from llmser_ray.config import RayConfig
from llmser_ray.ray_utils import init_ray

init_ray(RayConfig(num_cpus=2, loopback_only=sys.argv[1] == "1"), quiet=True)

@ray.remote
def pid():
    return os.getpid()

ray.get([pid.remote() for _ in range(2)])
me = psutil.Process()
listening = []
for p in [me, *me.children(recursive=True)]:
    try:
        name = p.name()
        socks = p.net_connections(kind="inet")
    except psutil.Error:
        continue
    listening += [[name, s.laddr.ip, s.laddr.port] for s in socks if s.status == psutil.CONN_LISTEN]
print(json.dumps({"node_ip": ray.util.get_node_ip_address(), "listening": listening,
                  "env_left": os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"),
                  "const_left": ray_constants.ENABLE_RAY_CLUSTER}))
ray.shutdown()
"""

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def _probe(loopback_only: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if loopback_only else "0"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(600)
def test_local_ray_listens_only_on_loopback() -> None:
    got = _probe(loopback_only=True)
    assert got["node_ip"] == "127.0.0.1"
    names = {n for n, _, _ in got["listening"]}
    assert {"gcs_server", "raylet"} <= names, got  # the probe sees Ray's own servers
    exposed = [s for s in got["listening"] if s[1] not in LOOPBACK]
    assert not exposed, exposed
    # Restored for this process: a later ray.init(address=...) must advertise a reachable address.
    assert got["env_left"] is None and got["const_left"] is True


@pytest.mark.timeout(600)
def test_loopback_only_false_is_rays_own_default() -> None:
    """The opt-out exposes the ports again (so the first test could fail on this machine)."""
    got = _probe(loopback_only=False)
    if got["node_ip"] == "127.0.0.1":
        pytest.skip("Ray finds no address but loopback on this machine: there is nothing to expose")
    assert [s for s in got["listening"] if s[1] not in LOOPBACK]
