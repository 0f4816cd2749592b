"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray per test module, with more logical CPUs than cores so that fractional stage
    actors and Ray Data's own tasks fit side by side on two cores (as the quickstart does), on
    127.0.0.1 only as the commands' local Ray."""
    import ray

    from llmser_ray.ray_utils import loopback_node

    with loopback_node():
        # address="local" as init_ray: a plain ray.init() joins a `ray start` cluster running on
        # the machine (an engineer's experiments) and then fails on num_cpus.
        ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()
