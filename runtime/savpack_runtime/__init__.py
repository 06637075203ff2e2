"""savpack-runtime: load SAV packs and classify with numpy (and onnxruntime for bundles). No torch, no transformers."""

from .classifier import Classifier
from .errors import SavpackError
from .format import FORMAT_VERSION
from .pack import Pack
from .result import PackResult, Result
from .vote import Votes, classify_vectors, cosine_to_centroids, vote

__version__ = "0.1.0"

__all__ = ["Classifier", "FORMAT_VERSION", "Pack", "PackResult", "Result", "SavpackError", "Votes", "__version__", "classify_vectors", "cosine_to_centroids", "vote"]
