"""Response lengths (Long-is-more): characters and tokens of a named tokenizer."""
