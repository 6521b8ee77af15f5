"""GPT-4-LLM's comparison data: K responses per prompt, each graded 1-10 by a judge, and every
pair with a lower and a higher score (the reward model's training data)."""
