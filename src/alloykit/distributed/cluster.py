"""Ray, an optional extra: import it with a one-line message when absent, and join or start a cluster.

``--ray`` with no address starts a local cluster in this process (``ray.init()``), ``auto``
joins the cluster this machine belongs to (``ray start`` ran here), anything else is a
cluster address (``HOST:PORT`` of the head's GCS, or ``ray://HOST:10001``). A process that
already called ``ray.init`` (a test, a notebook) keeps its connection.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from alloykit.errors import AlloyError

_log = logging.getLogger(__name__)

PIP_RAY = "pip install 'alloykit[ray]'  (or: pip install 'ray[default]')"

#: what ``--ray`` with no address means
LOCAL = "local"
#: Ray's authentication mode variable (docs.ray.io/en/latest/ray-security/token-auth.html)
AUTH_MODE = "RAY_AUTH_MODE"


class RayMissing(AlloyError):
    pass


def import_ray(address: str | None = None) -> Any:
    """The ``ray`` module, or one line naming the pip command. ``address``: where it will connect
    (``LOCAL``: a new local cluster), when known before the first import."""
    if address == LOCAL and "ray" not in sys.modules and AUTH_MODE not in os.environ:
        # Ray turns token authentication on for a new local cluster and warns so on every start unless
        # the mode is set explicitly: set it to the mode Ray chose anyway (it is read once, at import)
        os.environ[AUTH_MODE] = "token"
    try:
        import ray
    except ImportError:
        raise RayMissing(f"--ray needs the ray package, which is not installed: {PIP_RAY}") from None
    return ray


def connect(address: str | None = LOCAL, *, num_cpus: int | None = None) -> Any:
    """Join (or start) a Ray cluster and return the ``ray`` module.

    ``address``: ``None`` or ``"local"`` starts a local cluster (``num_cpus`` workers, default
    every core); ``"auto"`` joins the running cluster of this machine; else a cluster address."""
    ray = import_ray(LOCAL if address is None else address)
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    try:
        if address in (None, LOCAL):
            ray.init(num_cpus=num_cpus, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except ConnectionError as err:
        raise AlloyError(f"--ray {address}: cannot join the Ray cluster ({str(err).splitlines()[0]}); start one with "
                         "'ray start --head' or give the head's address (HOST:6379)") from None
    resources = ray.cluster_resources()
    _log.info(f"ray cluster: {len(ray.nodes())} node(s), {resources.get('CPU', 0):g} CPUs")
    return ray


def cluster_cpus(ray: Any) -> int:
    return int(ray.cluster_resources().get("CPU", 1))
