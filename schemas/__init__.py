"""The record format of the project: feature keys, class names, encode/decode, dataset layout."""

from schemas.record import *  # noqa: F403
from schemas.record import __all__  # noqa: F401
