"""gleaner: curate instruction-tuning data (AlpaGasus, DEITA) on Prefect and Ray."""

__version__ = "0.1.0"
