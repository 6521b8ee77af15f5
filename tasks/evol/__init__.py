"""DEITA's EVOL data (SPEC §2, §8): seeds evolved M times by a rewriter LLM, the M+1 versions
ranked and scored in one call, and the (text, score) items that train a complexity or a
quality scorer."""
