"""attnkit.patterns: see what attention heads do, in attnkit models and in HF models.

Capture every layer's and head's weights, score each head (previous-token, next-token,
first-token sink, delimiter, induction, entropy, mean distance), label heads by their top
score, and draw them: a layers x heads grid, a score table, one head with its tokens,
and one self-contained HTML page. From Python::

    import attnkit
    from attnkit import patterns

    tokens = patterns.repeated_tokens(4, period=32, vocab=model.config.vocab)
    maps = patterns.capture(model, tokens)          # any module with attnkit attention
    maps.scores()["induction"]                       # [layers, heads]
    maps.labels()                                    # [["previous-token", ...], ...]
    patterns.write_page(maps, "patterns/")           # patterns/index.html + PNGs

For a Hugging Face model (transformers installed): ``patterns.capture_hf(model, ids)``.
For a saved model, ``patterns.analyze(path)``; from the shell, ``attnkit patterns PATH``
(a ``TinyLM.save`` file or a ``save_pretrained`` directory).

Shape legend: weights [N, B, H, L, L] (N layers, B sequences, H heads, L tokens; row =
query, column = key), scores [N, H].
"""

from attnkit.patterns.analyze import analyze, load_model
from attnkit.patterns.capture import (
    EXPLICIT,
    AttentionRecorder,
    LayerRecord,
    capture,
    record_attention,
)
from attnkit.patterns.hf import capture_hf, is_hf_directory, load_hf
from attnkit.patterns.inputs import repeated_tokens
from attnkit.patterns.maps import AttentionMaps
from attnkit.patterns.scores import (
    LABELS,
    SCORE_NAMES,
    attention_entropy,
    delimiter_score,
    first_token_score,
    induction_score,
    induction_score_periodic,
    label_heads,
    mean_attention_distance,
    next_token_score,
    previous_token_score,
    row_distributions,
    row_scores,
)
from attnkit.patterns.views import (
    grid_figure,
    head_figure,
    page_html,
    save_figure,
    scores_figure,
    write_page,
)
from attnkit.patterns.weights import (
    argmax_weights,
    implicit_weights,
    linear_weights,
    softmax_weights,
)

__all__ = [
    "EXPLICIT",
    "LABELS",
    "SCORE_NAMES",
    "AttentionMaps",
    "AttentionRecorder",
    "LayerRecord",
    "analyze",
    "argmax_weights",
    "attention_entropy",
    "capture",
    "capture_hf",
    "delimiter_score",
    "first_token_score",
    "grid_figure",
    "head_figure",
    "implicit_weights",
    "induction_score",
    "induction_score_periodic",
    "is_hf_directory",
    "label_heads",
    "linear_weights",
    "load_hf",
    "load_model",
    "mean_attention_distance",
    "next_token_score",
    "page_html",
    "previous_token_score",
    "record_attention",
    "repeated_tokens",
    "row_distributions",
    "row_scores",
    "save_figure",
    "scores_figure",
    "softmax_weights",
    "write_page",
]
