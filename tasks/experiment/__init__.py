"""The experiment grid: arms selected from one pool, fine-tuned alike, judged against a baseline."""
