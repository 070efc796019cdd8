"""abdoseg training, prediction and command line (``python -m training`` / ``abdoseg``)."""

__version__ = "0.1.0"
