"""One LLM client for every stage that talks to an OpenAI-compatible endpoint.

Rating (AlpaGasus), DEITA's endpoint scorer and the pairwise judge all go
through :class:`LLMClient`: the openai SDK's own back-off, a retry for what
the SDK does not retry (broken bodies, unusable answers), per-worker
concurrency, a cluster-wide rate limit and token accounting.
"""

from gleaner.llm.client import (
    Completion,
    LLMClient,
    LLMError,
    Usage,
    describe_error,
    expected_score,
    is_transient,
)

__all__ = [
    "Completion",
    "LLMClient",
    "LLMError",
    "Usage",
    "describe_error",
    "expected_score",
    "is_transient",
]
