"""uad: unsupervised anomaly detection in brain MRI (the backend of the UADExtension Slicer extension)."""

__version__ = "0.1.0"
