"""One LLM client for every stage that talks to an OpenAI-compatible endpoint.

Rating (AlpaGasus), DEITA's endpoint scorer and the pairwise judge all go
through :class:`gleaner.llm.client.LLMClient`: the openai SDK's own back-off, a
retry for what the SDK does not retry (broken bodies, unusable answers),
per-worker concurrency, a cluster-wide rate limit (:mod:`gleaner.llm.ratelimit`)
and token accounting.

Nothing is imported here: the rate limiter's Ray actor imports
:mod:`gleaner.llm.ratelimit` in a fresh process, and should not wait for the
openai SDK it does not use.
"""
