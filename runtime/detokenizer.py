"""Generated ids -> text as it becomes final, with stop strings.

    detok = IncrementalDetokenizer(tokenizer, stop=["\\n\\n"])
    for token in tokens:
        print(detok.push(token), end="")     # the new text; "" while held back
        if detok.stopped is not None:
            break
    print(detok.flush(), end="")            # what was held back, at the end of the request

Text is held back while it ends in a partial UTF-8 character (the tokenizer decodes it to
U+FFFD) or in what could be the start of a stop string. A stop string may span any number
of tokens; the output ends just before it (the stop string is not part of the text).
"""

from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"


def partial_suffix(text: str, tag: str) -> int:
    """How many characters at the end of text may be the start of tag (text to hold back
    until the next piece says whether tag follows)."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1)
                 if tag.startswith(text[-k:])), 0)


class StopChecker:
    """Stop strings over a stream of text pieces."""

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = tuple(stop)
        self.text = ""            # everything fed so far, cut before a matched stop
        self.sent = 0             # how much of text feed() has returned
        self.stopped: str | None = None

    def feed(self, piece: str) -> str:
        """Add text; returns the part now known not to be in (or start) a stop string."""
        if self.stopped is not None:
            return ""
        self.text += piece
        # A match starts at or after `sent`: earlier text was released only when no stop
        # string could start in it.
        found = [(i, s) for s in self.stop if (i := self.text.find(s, self.sent)) >= 0]
        if found:
            i, self.stopped = min(found, key=lambda f: f[0])
            self.text = self.text[:i]
            return self._release(i)
        rest = self.text[self.sent:]
        hold = max((partial_suffix(rest, s) for s in self.stop), default=0)
        return self._release(len(self.text) - hold)

    def flush(self) -> str:
        """At the end of the request: the text held back as a possible stop start."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        out, self.sent = self.text[self.sent:end], end
        return out


class IncrementalDetokenizer:
    """Decodes generated ids incrementally (a `tokenizers.Tokenizer`), vLLM's way: each new
    token is decoded together with a few tokens before it, so a decoder that adds spaces
    between tokens or strips a leading one still gives the text of the whole sequence."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0    # ids[prefix_offset:read_offset] were decoded already
        self.read_offset = 0
        self.checker = StopChecker(stop)

    @property
    def stopped(self) -> str | None:
        """The stop string that ended the text, if one did."""
        return self.checker.stopped

    @property
    def text(self) -> str:
        """The text so far (ending before a matched stop), held-back parts included."""
        return self.checker.text

    def push(self, token_id: int) -> str:
        """Add one generated id; returns the text it completes (may be "")."""
        if self.stopped is not None:
            return ""
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if full.endswith(REPLACEMENT) or len(full) <= len(prefix):
            return ""             # a partial UTF-8 character (or nothing yet)
        if full.startswith(prefix):
            new = full[len(prefix):]
        else:                     # the window decodes differently: decode everything
            new = self._decode(self.ids)[len(self.checker.text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self.checker.feed(new)

    def flush(self) -> str:
        """At the end of the request: the rest, a trailing partial character included."""
        if self.stopped is None and self.read_offset < len(self.ids):
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            full = self._decode(self.ids[self.prefix_offset:])
            self.read_offset = len(self.ids)
            out = self.checker.feed(full[len(prefix):] if full.startswith(prefix) else "")
            return out + self.checker.flush()
        return self.checker.flush()

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
