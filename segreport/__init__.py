"""segreport: segment lesions in CT and report them in words."""

__version__ = "0.1.0"
