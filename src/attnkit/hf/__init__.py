"""attnkit inside Hugging Face transformers (``pip install attnkit[hf]``).

``attnkit`` itself never imports this package (nor transformers).
"""

from attnkit.hf.attention import DEFAULT_NAME, attention_function, register

__all__ = [
    "DEFAULT_NAME",
    "attention_function",
    "register",
]
