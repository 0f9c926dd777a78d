"""Text of a growing token list, a piece per step, for streams: decodes a short window, never the whole output.

A token can end inside a multi-byte character (byte-level BPE), which decodes to U+FFFD until the next tokens
complete it: such text is held back until it is whole. Each step decodes only the tokens since the last emitted
text plus the ones emitted the step before (`prefix_offset`), so that word-boundary spacing (SentencePiece's
leading space) comes out as in a full decode.
"""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.prefix_offset = 0   # decoding starts here (context only)
        self.read_offset = 0     # tokens before this one are already in the emitted text

    def step(self, tokens: Sequence[int]) -> str:
        """The text that `tokens` (the whole output so far) adds to what earlier calls returned."""
        decode = self.tokenizer.decode
        prefix = decode(tokens[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip_special_tokens)
        full = decode(tokens[self.prefix_offset:], skip_special_tokens=self.skip_special_tokens)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # nothing new yet, or a character still incomplete
        # The tokens just emitted become the next step's context.
        self.prefix_offset, self.read_offset = self.read_offset, len(tokens)
        return full[len(prefix):]
