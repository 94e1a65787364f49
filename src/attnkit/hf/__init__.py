"""attnkit inside Hugging Face transformers (``pip install attnkit[hf]``).

``attnkit`` itself never imports this package (nor transformers).
"""

from attnkit.hf.attention import DEFAULT_NAME, attention_function, register
from attnkit.hf.linear_layers import SUPPORTED, accelerate, accelerated, is_accelerated, restore

__all__ = [
    "DEFAULT_NAME",
    "SUPPORTED",
    "accelerate",
    "accelerated",
    "attention_function",
    "is_accelerated",
    "register",
    "restore",
]
