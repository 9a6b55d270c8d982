"""The small Pale backbone the dense-prediction tests build, as kwargs and as a recipe override."""
import json

TINY = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2))
TINY_YAML = json.dumps({k: list(v) for k, v in TINY.items()})  # JSON is YAML flow style
