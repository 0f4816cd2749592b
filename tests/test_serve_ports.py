"""Ports picked before the process that binds them (issue 22).

Fast tests check the picking rule and the one-line errors; slow ones take a chosen port between
the choice and Serve's start, on a real local Ray with the default HAProxy ingress, and check that
the start recovers (a picked port) or fails with the line naming the port (a port the user set).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llmser_ray import ports
from llmser_ray.config import ServeConfig, load_config
from llmser_ray.errors import ConfigError
from llmser_ray.serving import ingress

pytestmark = pytest.mark.timeout(900)


@pytest.fixture
def held() -> Iterator[int]:
    """A port outside the ephemeral range that this test holds with a listening socket."""
    port = ports.pick_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        yield port


def test_ephemeral_range_is_read_from_the_kernel_file(tmp_path: Path) -> None:
    f = tmp_path / "range"
    f.write_text("32768\t60999\n")
    assert ports.ephemeral_range(f) == (32768, 60999)
    assert ports.ephemeral_range(tmp_path / "missing") == (49152, 65535)  # IANA, where none is published


@pytest.mark.parametrize("ephemeral", [(32768, 60999), (49152, 65535), (1024, 65535), (20000, 29999)])
def test_candidate_ports_avoid_the_ephemeral_range_and_rays_fixed_ranges(ephemeral) -> None:
    ranges = ports.candidate_ports(ephemeral)
    lo, hi = ephemeral
    allowed = {p for r in ranges for p in r}
    for bad_lo, bad_hi in [(lo, hi), (0, 19999), (30000, 31000), (40000, 41000)]:
        assert not allowed & set(range(bad_lo, bad_hi + 1))
    if ephemeral == (32768, 60999):  # Linux's default: what is left is used
        assert ranges == [range(20000, 30000), range(31001, 32768), range(61000, 65536)]


def test_pick_port_returns_a_bindable_port_outside_the_ephemeral_range(held: int) -> None:
    lo, hi = ports.ephemeral_range()
    picked = {ports.pick_port() for _ in range(50)}
    assert all(20000 <= p <= 65535 and not lo <= p <= hi for p in picked)
    assert all(ports.port_free("127.0.0.1", p) for p in picked)
    assert not ports.port_free("127.0.0.1", held)


def test_serve_env_puts_stats_and_metrics_on_unix_sockets_and_picks_the_fallback_port() -> None:
    env = ingress.serve_env(ServeConfig())
    assert env["LLMSER_HAPROXY_UNIX_LISTENERS"] == "stats,prometheus"
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in env and "RAY_SERVE_HAPROXY_METRICS_PORT" not in env
    lo, hi = ports.ephemeral_range()
    fallback = {int(ingress.serve_env(ServeConfig())["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"]) for _ in range(5)}
    assert all(not lo <= p <= hi for p in fallback) and len(fallback) > 1  # picked fresh each call


def test_serve_env_uses_explicit_ports_as_given() -> None:
    a, b, c = ports.pick_port(), ports.pick_port(), ports.pick_port()
    env = ingress.serve_env(ServeConfig(stats_port=a, metrics_port=b, fallback_port=c))
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == str(a)
    assert env["RAY_SERVE_HAPROXY_METRICS_PORT"] == str(b)
    assert env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] == str(c)
    assert env["LLMSER_HAPROXY_UNIX_LISTENERS"] == ""


@pytest.mark.parametrize("key", ["port", "stats_port", "metrics_port", "fallback_port"])
def test_an_explicit_port_in_use_is_a_one_line_error_naming_it(held: int, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        ingress.check_explicit_ports(ServeConfig(**{key: held}))
    assert f"serve.{key}: port {held} on 127.0.0.1 is already in use" in str(e.value)
    assert "\n" not in str(e.value) and e.value.fix


# ----------------------------------------------------------------------------- slow: real Ray + Serve


@pytest.fixture
def clean_ray() -> Iterator[None]:
    """No Ray before the test; Serve, Ray and the ingress flags gone after it."""
    import ray
    from ray import serve as ray_serve

    if ray.is_initialized():
        ray.shutdown()
    saved = dict(os.environ)
    yield
    try:
        ray_serve.shutdown()
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def _ray_cfg(*more: str):
    return load_config(None, ["ray.num_cpus=2", "ray.include_dashboard=false", *more])


@pytest.mark.slow
@pytest.mark.parametrize("taken", ["http", "fallback"])
def test_a_picked_port_taken_before_serve_binds_it_is_picked_again(
        clean_ray, held: int, taken: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race, made certain: the first pick of the HTTP port (HAProxy binds it: "cannot bind
    socket") or of the fallback proxy's port (a Serve proxy actor binds it: "address already in
    use") returns a port this test already listens on. The start must notice, tear down and
    come up on fresh ports, with no error reaching the caller."""
    real = ports.pick_port
    calls: list[int] = []
    order = {"http": 1, "fallback": 2}[taken]  # start_local_serve picks the HTTP port, then serve_env

    def pick(host: str = "127.0.0.1", **kw) -> int:
        calls.append(1)
        return held if len(calls) == order else real(host, **kw)

    monkeypatch.setattr(ports, "pick_port", pick)
    lines: list[str] = []
    ingress.start_local_serve(_ray_cfg("serve.port=0"), log=lines.append)
    assert len(lines) == 1 and "retrying with fresh ports" in lines[0], lines
    # Three picks per attempt: the HTTP port, the fallback proxy's port (these two, in this order,
    # before Ray starts) and the local Ray's state-API address (ray_utils._local_ray_env: the
    # dashboard is off here, so a port nothing listens on).
    assert len(calls) == 6
    from ray.serve.context import _get_global_client

    port = int(_get_global_client().http_config.port)
    assert port != held
    fallback = int(os.environ["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"])
    assert fallback != held
    # Serve answers on the new port (404: no application deployed yet, but HAProxy is up).
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=30).status_code in (404, 503)


@pytest.mark.slow
def test_an_explicit_port_taken_before_serve_binds_it_fails_with_the_line(
        clean_ray, held: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A port the user set is used as given: free when checked, taken before the proxy binds
    it, the start fails with the one-line error naming it instead of picking another."""
    real = ingress.check_explicit_ports
    checks: list[int] = []

    def check_later(sc: ServeConfig) -> None:
        checks.append(1)
        if len(checks) > 1:  # the first check sees it free (taken "after" it)
            real(sc)

    monkeypatch.setattr(ingress, "check_explicit_ports", check_later)
    with pytest.raises(ConfigError) as e:
        ingress.start_local_serve(_ray_cfg("serve.port=0", f"serve.fallback_port={held}"),
                                  log=lambda _: None)
    assert f"serve.fallback_port: port {held}" in str(e.value)
    import ray

    assert not ray.is_initialized()  # torn down, nothing left running
