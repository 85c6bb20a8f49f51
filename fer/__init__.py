"""fer: facial-emotion recognition training pipeline for FER2013-class data."""

__version__ = "0.1.0"
