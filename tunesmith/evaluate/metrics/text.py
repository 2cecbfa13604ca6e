"""Answer normalisation, as in the SQuAD evaluation script (`normalize_answer` of evaluate-v2.0.py).

    case         lower-case
    punctuation  drop every punctuation character: ASCII's string.punctuation (what SQuAD drops) and
                 any Unicode character of category P* (so 「」, ¿ and … go too)
    articles     drop the English articles a, an, the as whole words
    whitespace   collapse runs of whitespace to one space

applied in SQuAD's order (case, punctuation, articles, whitespace). Surrounding whitespace is
always stripped. All four together are SQuAD's normalisation, which token_f1 always uses;
exact_match and contains use those listed in eval.normalize.
"""

from __future__ import annotations

import re
import string
import unicodedata

SQUAD = ("case", "punctuation", "articles", "whitespace")
ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def is_punctuation(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def normalize(text: str, steps=SQUAD) -> str:
    """`text` with the normalisation steps named in `steps` applied, in SQuAD's order, and stripped."""
    if "case" in steps:
        text = text.lower()
    if "punctuation" in steps:
        text = "".join(c for c in text if not is_punctuation(c))
    if "articles" in steps:
        text = ARTICLES.sub(" ", text)
    if "whitespace" in steps:
        text = " ".join(text.split())
    return text.strip()


def squad_tokens(text: str) -> list[str]:
    """SQuAD's get_tokens: the fully normalised text split on whitespace."""
    return normalize(text).split()
