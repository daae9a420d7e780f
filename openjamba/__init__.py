"""openjamba: an open, fast, trainable implementation of Jamba (hybrid attention + Mamba + MoE)."""

from .cache import HybridCache
from .config import PRESETS, ConfigError, JambaConfig
from .model import JambaForCausalLM, JambaOutput

__version__ = "0.1.0"

__all__ = ["JambaConfig", "ConfigError", "PRESETS", "JambaForCausalLM", "JambaOutput", "HybridCache",
           "__version__"]
