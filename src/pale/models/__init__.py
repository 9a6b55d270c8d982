"""Model families. Importing this registers them with timm (and the ablation attention modes)."""
from . import pale_ablations  # noqa: F401  (registers the sequential and vanilla attention modes)
from .pale_transformer import (
    ATTENTION_MODES,
    ATTN_MODES,
    POS_EMBEDS,
    AttentionMode,
    GroupedAttention,
    PaleBlock,
    PaleStage,
    PaleTransformer,
    PSAttention,
    attention_mode,
    create_attention,
    pale_base,
    pale_small,
    pale_tiny,
    register_attention_mode,
    unregister_attention_mode,
)

__all__ = ["ATTENTION_MODES", "ATTN_MODES", "POS_EMBEDS", "AttentionMode", "GroupedAttention", "PaleBlock", "PaleStage",
           "PaleTransformer", "PSAttention", "attention_mode", "create_attention", "pale_base", "pale_small",
           "pale_tiny", "register_attention_mode", "unregister_attention_mode"]
