"""gleaner: curate instruction-tuning data (AlpaGasus rating, DEITA selection) on Prefect and Ray."""

__version__ = "0.1.0"
