r"""Score networks: ``net(x, t, y=None) -> x-shaped``. Raw networks know nothing of SDEs; wrap one in
[`sdegen.ScoreModel`][sdegen.parameterization.ScoreModel] to get a score function. Imports torch only."""

from .embeddings import FourierEmbedding, LabelEmbedding, SinusoidalEmbedding
from .mlp import MLP
from .unet import UNet

__all__ = ["MLP", "UNet", "SinusoidalEmbedding", "FourierEmbedding", "LabelEmbedding"]
