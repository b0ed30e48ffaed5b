"""taskvec_interp: task vectors in in-context learning, measured and manipulated.

Han, Song, Gore & Agrawal, "Emergence and Effectiveness of Task Vectors in In-Context Learning:
An Encoder-Decoder Perspective" (ICML 2025).
"""

from . import hooks
from .adapters import Adapter, Generation, ModelInputs, load_model, verify_adapter
from .hooks import Site

__version__ = "0.1.0"

__all__ = ["Adapter", "Generation", "ModelInputs", "Site", "hooks", "load_model", "verify_adapter", "__version__"]
