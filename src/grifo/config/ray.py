"""The `engine.ray` section: a point's engine as a Ray Serve application (`grifo[ray]`).

Its own module only to keep `model.py` within the project's module size.
"""

from __future__ import annotations

from typing import Annotated

import msgspec


class RayConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Where Ray runs and how Serve scales the engine's replicas (its autoscaler adds a replica
    while the replicas average more than `target_ongoing_requests` requests each)."""

    address: str = "local"
    """`local`: start Ray inside the point; `auto`: join the cluster of this node (a point on a
    cluster node); `ray://head:10001`: a remote cluster through Ray Client."""
    min_replicas: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 1
    max_replicas: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 1
    target_ongoing_requests: Annotated[float, msgspec.Meta(gt=0, le=4096)] = 2.0
    replica_cpus: Annotated[float, msgspec.Meta(ge=0, le=1024)] | None = None
    """CPUs Ray reserves for each replica (default: the engine's `threads`; 1 where they are
    `auto`)."""
    replica_gpus: Annotated[float, msgspec.Meta(ge=0, le=64)] | None = None
    """GPUs Ray reserves for each replica, so that replicas land on GPU nodes and share no GPU
    unasked (default: 1 when the engine has `gpu_layers`, else 0; a fraction shares one)."""

    def __post_init__(self) -> None:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
