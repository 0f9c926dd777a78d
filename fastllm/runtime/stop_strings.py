"""Stop strings, one rule for every entry point: a completion stops at the token that completes a stop string.

`StopStrings.hit(tokens)` is True when the text of `tokens` holds a stop string that the text without the newest
token did not: a new occurrence ending in the newest token (Hugging Face's `stop_strings` and vLLM's `stop` stop
at the same token). Entry points differ only in what they return: `generate()` keeps every token (HF), `LLM`
cuts the text before the stop string (`cut()`, vLLM), both keep the tokens.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    def __init__(self, stops: Sequence[str], tokenizer) -> None:
        if tokenizer is None:
            raise ValueError("stop strings need a tokenizer (to turn tokens into text)")
        self.stops = [stops] if isinstance(stops, str) else list(stops)
        if not self.stops or not all(isinstance(s, str) and s for s in self.stops):
            raise ValueError(f"stop strings must be non-empty strings, got {stops!r}")
        self.tokenizer = tokenizer
        # Trailing tokens enough to hold the longest stop string: every token decodes to at least one character,
        # except some that decode to an empty prefix of a multi-byte character: keep a margin.
        self.window = max(len(s) for s in self.stops) + 2

    def hit(self, tokens: Sequence[int]) -> bool:
        """Whether the newest token completes a stop string (decodes only the last `window` tokens)."""
        if not tokens:
            return False
        tail = list(tokens[-self.window:])
        text, before = self.tokenizer.decode(tail), self.tokenizer.decode(tail[:-1])
        return any(s in text and s not in before for s in self.stops)

    def cut(self, text: str) -> str:
        """`text` up to the stop string that ended it (its last occurrence: earlier ones did not stop it)."""
        cuts = [text.rfind(s) for s in self.stops if s in text]
        return text[:min(cuts)] if cuts else text
