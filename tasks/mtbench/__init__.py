"""MT-Bench the way FastChat's llm_judge runs it: two-turn answers, single-answer grading 1-10."""
