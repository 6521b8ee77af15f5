"""IFD (Cherry LLM) and Superfiltering: instruction-following difficulty from one causal LM."""
