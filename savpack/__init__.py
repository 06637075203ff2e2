"""savpack: find the attention heads of a frozen (vision-)language model that classify, and ship them as a pack."""

__version__ = "0.1.0"
