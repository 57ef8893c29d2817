"""surge_nlp: SURGE binarization (1-bit weights and activations) for BERT-family models.

Example:
    >>> import surge_nlp
    >>> from transformers import AutoModelForSequenceClassification
    >>> model = AutoModelForSequenceClassification.from_pretrained(  # doctest: +SKIP
    ...     "bert-base-uncased", quantization_config=surge_nlp.SurgeConfig(estimator="surge"))
    >>> surge_nlp.summary(model)  # doctest: +SKIP
"""

from . import hub
from .attention import AttentionQuantizers
from .binarize import binarize, from_pretrained
from .binarizers import calibrate
from .compensator import GradientCompensator
from .config import SurgeConfig
from .deploy import deploy
from .hub import push_to_hub
from .integration import set_training_progress, surge_linears
from .layers import BinarizedLayer, SurgeEmbedding, SurgeLinear
from .packed_layers import PackedSurgeEmbedding, PackedSurgeLinear
from .quantizer import SurgeHfQuantizer, register
from .serialization import CheckpointError, pack_model, set_checkpoint_format
from .summary import summary

register()

__version__ = "0.1.0"

__all__ = [
    "AttentionQuantizers",
    "BinarizedLayer",
    "CheckpointError",
    "GradientCompensator",
    "PackedSurgeEmbedding",
    "PackedSurgeLinear",
    "SurgeConfig",
    "SurgeEmbedding",
    "SurgeHfQuantizer",
    "SurgeLinear",
    "binarize",
    "calibrate",
    "deploy",
    "from_pretrained",
    "pack_model",
    "push_to_hub",
    "register",
    "set_checkpoint_format",
    "set_training_progress",
    "summary",
    "surge_linears",
]
