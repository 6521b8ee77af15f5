"""Making data: Alpaca's self-instruct from seed tasks, and GPT-4-LLM's teacher regeneration."""
