"""featurize: dataset-scale image and video feature extraction on Ray Data."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("featurize")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
