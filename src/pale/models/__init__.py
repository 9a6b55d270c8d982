"""Model families. Importing this registers them with timm."""
from .pale_transformer import (
    ATTN_MODES,
    POS_EMBEDS,
    PaleBlock,
    PaleStage,
    PaleTransformer,
    PSAttention,
    pale_base,
    pale_small,
    pale_tiny,
)

__all__ = ["ATTN_MODES", "POS_EMBEDS", "PaleBlock", "PaleStage", "PaleTransformer", "PSAttention",
           "pale_base", "pale_small", "pale_tiny"]
