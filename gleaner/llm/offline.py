"""The offline default, wired in: one local llama.cpp server for whichever role lacks an endpoint.

With no rating endpoint (or no judge endpoint) configured, gleaner starts the
SmolLM2 server of :mod:`gleaner.llm.local_server` once and points the roles
without an endpoint at it, each with the settings a 135M model on a CPU needs:

- the rater rates in score-only mode (SmolLM2 answers the prompt with prose,
  but its top_logprobs work), two requests in flight (one server on this
  machine: more only queue), few SDK retries (a loopback server is never rate
  limited: a connection error means it died, and the client says so);
- the judge answers under the score-line grammar with a small token cap
  (only its first line is read);
- the comparison judge (``compare``) answers "Rating: [[n]]" under a grammar, the EVOL
  rewriter writes short rewrites and ranks under the "[k] Score: n" grammar.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from gleaner.config import GleanerConfig

log = logging.getLogger("gleaner.llm.offline")
OFFLINE_CONCURRENCY = 2
OFFLINE_MAX_RETRIES = 2


def _endpoint(prefix: str, server: Any) -> dict[str, Any]:
    return {f"{prefix}.base_url": server.base_url, f"{prefix}.model": server.model,
            f"{prefix}.max_retries": OFFLINE_MAX_RETRIES,
            f"{prefix}.local_server": str(server.state_path)}


def with_offline_rater(config: GleanerConfig, server: Any) -> GleanerConfig:
    return config.with_overrides({
        **_endpoint("rate.endpoint", server),
        "rate.mode": config.rate.mode or "score-only",
        "rate.resources.concurrency": min(config.rate.resources.concurrency,
                                          OFFLINE_CONCURRENCY),
    })


def with_offline_judge(config: GleanerConfig, server: Any) -> GleanerConfig:
    """The one rule for gleaner's own judge, wherever its server was started."""
    return config.with_overrides({
        **_endpoint("evaluate.judge", server),
        "evaluate.judge_resources.concurrency": min(
            config.evaluate.judge_resources.concurrency, OFFLINE_CONCURRENCY),
        "evaluate.judge_max_tokens": config.evaluate.offline_judge_max_tokens,
        "evaluate.judge_grammar": config.evaluate.judge_grammar is not False,
    })


def with_offline_maker(config: GleanerConfig, server: Any, section: str) -> GleanerConfig:
    """Self-instruct's generator or the regeneration teacher on the local server: answers
    capped at the section's ``offline_max_tokens`` (a 2,048-token context on a CPU), one
    request at a time (the server decodes one anyway, and with one in flight its prompt cache
    does not depend on arrival order, so a seeded request is answered the same on a rerun)."""
    settings = getattr(config, section)
    return config.with_overrides({
        **_endpoint(f"{section}.endpoint", server),
        f"{section}.max_tokens": min(settings.max_tokens, settings.offline_max_tokens),
        f"{section}.resources.concurrency": 1,
    })


def with_offline_grader(config: GleanerConfig, server: Any) -> GleanerConfig:
    """The comparison judge on the local server: the answer forced to "Rating: [[n]]"."""
    return config.with_overrides({
        **_endpoint("compare.judge", server),
        "compare.max_tokens": min(config.compare.max_tokens, config.compare.offline_max_tokens),
        "compare.grammar": config.compare.grammar is not False,
        "compare.resources.concurrency": min(config.compare.resources.concurrency,
                                             OFFLINE_CONCURRENCY),
    })


def with_offline_rewriter(config: GleanerConfig, server: Any) -> GleanerConfig:
    """DEITA's EVOL rewriter and ranker on the local server: short rewrites (a 2,048-token
    context), the rank-and-score answer forced to its "[k] Score: n" lines."""
    evol = config.evol
    return config.with_overrides({
        **_endpoint("evol.endpoint", server),
        "evol.max_tokens": min(evol.max_tokens, evol.offline_max_tokens),
        "evol.score_grammar": evol.score_grammar is not False,
        "evol.resources.concurrency": min(evol.resources.concurrency, OFFLINE_CONCURRENCY),
    })


@contextlib.contextmanager
def offline_endpoints(config: GleanerConfig, *, rater: bool = False, judge: bool = False,
                      generator: bool = False, teacher: bool = False, grader: bool = False,
                      rewriter: bool = False) -> Iterator[GleanerConfig]:
    """``config`` with the asked roles that have no endpoint served by one local server."""
    needs_rater = rater and config.rate.endpoint.base_url is None
    needs_judge = judge and config.evaluate.judge.base_url is None
    makers = [section for section, asked in (("generate", generator), ("regenerate", teacher))
              if asked and getattr(config, section).endpoint.base_url is None]
    needs_grader = grader and config.compare.judge.base_url is None
    needs_rewriter = rewriter and config.evol.endpoint.base_url is None
    if not (needs_rater or needs_judge or makers or needs_grader or needs_rewriter):
        yield config
        return
    from gleaner.llm.local_server import local_llm_server

    if needs_judge:
        log.warning("no judge endpoint configured: judging with the offline SmolLM2 server; "
                    "set evaluate.judge.base_url (e.g. https://api.openai.com/v1) for GPT-4")
    for section in makers:
        log.warning("no %s endpoint configured: the offline SmolLM2 server answers (a 135M "
                    "model: expect most of its output to be filtered or poor); set "
                    "%s.endpoint.base_url for a real model", section, section)
    with local_llm_server(q4_0=config.rate.offline_q4_0) as server:
        live = with_offline_rater(config, server) if needs_rater else config
        for section in makers:
            live = with_offline_maker(live, server, section)
        live = with_offline_grader(live, server) if needs_grader else live
        live = with_offline_rewriter(live, server) if needs_rewriter else live
        yield with_offline_judge(live, server) if needs_judge else live
