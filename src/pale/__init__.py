"""pale: the Pale Transformer (Wu et al., AAAI 2022) for PyTorch.

``import pale`` registers ``pale_tiny``, ``pale_small`` and ``pale_base`` with timm.
"""
from .models import ATTN_MODES, POS_EMBEDS, PaleBlock, PaleStage, PaleTransformer, PSAttention, create_attention

__version__ = "0.1.0"
__all__ = ["ATTN_MODES", "POS_EMBEDS", "PaleBlock", "PaleStage", "PaleTransformer", "PSAttention", "create_attention",
           "__version__"]
