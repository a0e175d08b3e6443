"""nbkit: notebooks for personal Stable Diffusion models, built as tested software."""

__version__ = "0.1.0"

from nbkit.errors import NbkitError

__all__ = ["NbkitError", "__version__"]
