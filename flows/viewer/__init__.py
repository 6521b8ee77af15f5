"""``gleaner view``: a local web page over one run's store (pool, counts, evaluation, review)."""
