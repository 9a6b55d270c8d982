"""Model families. Importing this registers them with timm (and the ablation attention modes)."""
from . import pale_ablations  # noqa: F401  (registers the sequential and vanilla attention layers)
from .pale_transformer import (
    ATTN_MODES,
    POS_EMBEDS,
    GroupedAttention,
    PaleBlock,
    PaleStage,
    PaleTransformer,
    PSAttention,
    create_attention,
    pale_base,
    pale_small,
    pale_tiny,
)

__all__ = ["ATTN_MODES", "POS_EMBEDS", "GroupedAttention", "PaleBlock", "PaleStage", "PaleTransformer", "PSAttention",
           "create_attention", "pale_base", "pale_small", "pale_tiny"]
