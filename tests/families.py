"""The tiny models of every family (peftkit/tiny_models.py), under the name the tests import."""

from peftkit.tiny_models import FAMILIES, QV, SPECS, VOCAB_SIZE, build, inputs  # noqa: F401
