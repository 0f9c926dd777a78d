"""Stop strings, one rule for every entry point: a completion stops at the token that completes a stop string.

`StopStrings.hit(tokens)` is True when the text of `tokens` holds an occurrence of a stop string that ends in the
newest token's text (Hugging Face's `stop_strings` and vLLM's `stop` stop at the same token). Entry points differ
in which text is matched and in what they return. `LLM` matches the text it returns, decoded with
`skip_special_tokens` (vLLM), so a special token between the pieces of a stop string does not hide it, and cuts that
text before the stop string (`cut()`). `generate()` matches the text with special tokens spelled out (Hugging Face's
StopStringCriteria reads the vocabulary's token strings, special ones included) and keeps every token.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


class StopStrings:
    def __init__(self, stops: Sequence[str], tokenizer, skip_special_tokens: bool = True) -> None:
        if tokenizer is None:
            raise ValueError("stop strings need a tokenizer (to turn tokens into text)")
        self.stops = [stops] if isinstance(stops, str) else list(stops)
        if not self.stops or not all(isinstance(s, str) and s for s in self.stops):
            raise ValueError(f"stop strings must be non-empty strings, got {stops!r}")
        self.tokenizer = tokenizer
        # Trailing tokens enough to hold the longest stop string. Counted in UTF-8 bytes, not characters: a
        # byte-level vocabulary may spell one character with a token per byte (SmolLM2 spells U+20000 with four), so
        # a window of characters missed such a stop string altogether. Every token decodes to at least one byte,
        # except some that decode to nothing: keep a margin.
        self.window = max(len(s.encode("utf-8", "surrogatepass")) for s in self.stops) + 2
        # Special tokens decode to nothing in the matched text: they are left out of the window (which counts tokens
        # that spell something), so any number of them between a stop string's pieces still lets it match.
        self.skipped = frozenset(tokenizer.all_special_ids if skip_special_tokens else ())

    def hit(self, tokens: Sequence[int]) -> bool:
        """Whether the newest token completes a stop string (decodes only the last `window` tokens that are not
        skipped)."""
        if not tokens or tokens[-1] in self.skipped:  # a skipped token adds no text: it completes nothing
            return False
        tail = []
        for token in reversed(tokens):
            if token not in self.skipped:
                tail.append(token)
                if len(tail) == self.window:
                    break
        tail.reverse()
        text, before = self.tokenizer.decode(tail), self.tokenizer.decode(tail[:-1])
        # An occurrence must end in the newest token's text: an older one still in the window (one that min_tokens
        # let pass) must not hide it, as `s not in before` did.
        return _first_new(text, before, self.stops) is not None

    def cut(self, text: str, tokens: Sequence[int] | None = None) -> str:
        """`text` up to the stop string that ended it.

        With the completion's `tokens` (`text` being their decode with skip_special_tokens), that is the first
        occurrence ending in the last token's text: earlier ones did not stop it (min_tokens let them pass), and a
        last token can hold the stop string twice ("\n\n" for "\n"). Without them, the last occurrence.
        """
        if tokens:
            before = self.tokenizer.decode(list(tokens[:-1]), skip_special_tokens=True)
            start = _first_new(text, before, self.stops)
            if start is not None:
                return text[:start]
        cuts = [text.rfind(s) for s in self.stops if s in text]
        return text[:min(cuts)] if cuts else text


def _first_new(text: str, before: str, stops: Sequence[str]) -> int | None:
    """Where the first occurrence of a stop string in `text` that ends past `before` (the text without the newest
    token) starts, or None. Compared by common prefix: a character that the newest token completes decodes as
    U+FFFD in `before`."""
    new_from = len(os.path.commonprefix([before, text]))
    starts = [i for s in stops if (i := text.find(s, max(0, new_from - len(s) + 1))) != -1]
    return min(starts, default=None)
