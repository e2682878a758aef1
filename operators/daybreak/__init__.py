"""daybreak: reusable pipeline steps for models that are retrained every day."""

__version__ = "0.1.0"
