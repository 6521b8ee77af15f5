"""A reward model (GPT-4-LLM §3.2): one scalar r(x, y) from a sequence-classification head,
trained on the comparison pairs on Ray Train, then scoring every example of a run."""
