"""The hyla hybrid model: `Hyla` (nn.Module), `HylaConfig` and its presets."""

from model.config import PRESETS, HylaConfig, get_config
from model.model import Cache, Hyla

__all__ = ["Hyla", "HylaConfig", "Cache", "PRESETS", "get_config"]
