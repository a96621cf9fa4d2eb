"""Measure what steering changes: language of the answers and output quality."""
from __future__ import annotations

import re
from typing import Iterable

# Frequent function words that are unambiguous between French and English (no "a", "on", "as", ...).
FRENCH_WORDS = frozenset("""
le la les un une des du de et est sont pour que qui dans pas vous je il elle nous ils elles avec sur au aux
ce cette ces mais ou très plus faut peut être avoir fait comme leur leurs mon ma mes ton ta tes son sa ses
notre votre voici voilà aussi donc car parce quand où comment pourquoi oui non bien tout tous toutes
""".split())
ENGLISH_WORDS = frozenset("""
the is are and of to that it for you with this be can was were not have has will would they we he she
what which there their your from but or by how why when where yes no also because so all very here
""".split())
_WORD = re.compile(r"[a-zàâäçéèêëîïôöùûüÿœæ']+", re.IGNORECASE)
_FRENCH_LETTERS = re.compile(r"[àâçéèêëîïôùûœ]", re.IGNORECASE)


def detect_language(text: str) -> str:
    """'fr', 'en' or 'unknown', by counting unambiguous function words (French accents count for French)."""
    words = [word.strip("'").lower() for word in _WORD.findall(text)]
    french = sum(word in FRENCH_WORDS for word in words) + len(_FRENCH_LETTERS.findall(text)) / 2
    english = sum(word in ENGLISH_WORDS for word in words)
    if french == english:
        return "unknown"
    return "fr" if french > english else "en"


def language_rate(texts: Iterable[str], language: str) -> float:
    """Fraction of `texts` detected as `language` ('fr' or 'en')."""
    texts = list(texts)
    return sum(detect_language(text) == language for text in texts) / len(texts) if texts else 0.0


def quality(text: str, n: int = 4) -> float:
    """1 - fraction of repeated word n-grams (the paper's repetition measure; 1.0 = no repetition)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 1.0
    return len(set(grams)) / len(grams)
