"""The offline default, wired in: one local llama.cpp server for whichever role lacks an endpoint.

Each LLM stage registers the role it plays (``register("offline_role", name)``): where its
endpoint sits in the config and the settings a 135M model on a CPU needs there (the rater
in score-only mode, the judges under a grammar, short answers, few requests in flight).
With no endpoint configured for a role, :func:`offline_endpoints` starts the SmolLM2
server of :mod:`gleaner.llm.local_server` once and points every such role at it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from gleaner.config import GleanerConfig
from gleaner.registry import registry

log = logging.getLogger("gleaner.llm.offline")
OFFLINE_CONCURRENCY = 2  # one server on this machine: more requests only queue
OFFLINE_MAX_RETRIES = 2  # a loopback server is never rate limited: an error means it died


@dataclass(frozen=True)
class OfflineRole:
    """A role the local server can take: its endpoint's dotted key in the config, the
    overrides a 135M model on a CPU needs (from the config as it is), and what to tell the
    user when it is taken."""

    endpoint: str
    settings: Callable[[GleanerConfig], dict[str, Any]] = field(default=lambda config: {})
    notice: str | None = None


def role(name: str) -> OfflineRole:
    return registry("offline_role").get(name)


def section_of(config: GleanerConfig, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def offline_endpoint(endpoint: Any) -> Any:
    """What a role without an endpoint is planned with: the offline server's model (free)."""
    from gleaner.llm.local_server import DEFAULT_ALIAS

    return endpoint.model_copy(update={"model": DEFAULT_ALIAS})


def capped_concurrency(config: GleanerConfig, resources: str) -> dict[str, Any]:
    """At most OFFLINE_CONCURRENCY requests in flight for ``resources`` (a dotted key)."""
    current = section_of(config, resources).concurrency  # None: the stage's own (at least 5)
    return {f"{resources}.concurrency": min(current or OFFLINE_CONCURRENCY, OFFLINE_CONCURRENCY)}


def maker_settings(section: str) -> Callable[[GleanerConfig], dict[str, Any]]:
    """Answers capped at the section's ``offline_max_tokens`` (a 2,048-token context on a
    CPU), one request at a time (the server decodes one anyway, and with one in flight its
    prompt cache does not depend on arrival order, so a seeded request is answered the same
    on a rerun)."""
    def settings(config: GleanerConfig) -> dict[str, Any]:
        own = getattr(config, section)
        return {f"{section}.max_tokens": min(own.max_tokens, own.offline_max_tokens),
                f"{section}.resources.concurrency": 1}

    return settings


def with_offline(config: GleanerConfig, server: Any, name: str) -> GleanerConfig:
    """``config`` with role ``name`` answered by ``server`` under the role's settings."""
    taken = role(name)
    return config.with_overrides({
        f"{taken.endpoint}.base_url": server.base_url, f"{taken.endpoint}.model": server.model,
        f"{taken.endpoint}.max_retries": OFFLINE_MAX_RETRIES,
        f"{taken.endpoint}.local_server": str(server.state_path),
        **taken.settings(config)})


@contextlib.contextmanager
def offline_endpoints(config: GleanerConfig, *roles: str) -> Iterator[GleanerConfig]:
    """``config`` with each named role that has no endpoint served by one local server."""
    needed = [name for name in roles
              if section_of(config, role(name).endpoint).base_url is None]
    if not needed:
        yield config
        return
    from gleaner.llm.local_server import local_llm_server

    for name in needed:
        if role(name).notice:
            log.warning("%s", role(name).notice)
    with local_llm_server(q4_0=config.rate.offline_q4_0) as server:
        live = config
        for name in needed:
            live = with_offline(live, server, name)
        yield live
