"""The runs of a store and their state (gleaner runs)."""
