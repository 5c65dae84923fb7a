"""Reasoning outputs: a thinking model's <think>...</think> apart from its answer.

    split("<think>Paris is in France.</think>Paris.", opened=False)
    # -> ("Paris is in France.", "Paris.")

Qwen3, QwQ and DeepSeek-R1 write their reasoning between <think> and </think>, then the
answer. The chat response carries the reasoning as `message.reasoning` (vLLM's field; also
as `reasoning_content`, its older name, which many clients read) and the answer as `content`.

Whether a reply is thinking at its start depends on the prompt as much as on the model:
DeepSeek-R1's and QwQ's templates end the prompt inside an opened <think> block, so the
reply begins in reasoning without the tag; Qwen3's writes the tag itself, and with
`enable_thinking: false` its template closes an empty block in the prompt. So `opened` says
whether the rendered prompt ends inside the block, and the reply says the rest: a reply that
opens <think> is reasoning until </think>; an opened one that never closes it (cut short by
max_tokens) is all reasoning.
"""

from __future__ import annotations

from llmc.runtime.detokenizer import partial_suffix

OPEN, CLOSE = "<think>", "</think>"


def detect(template: str | None) -> bool:
    """Whether a chat template's model thinks in <think> blocks."""
    return bool(template) and CLOSE in template


def opened(prompt: str) -> bool:
    """Whether a rendered prompt leaves its reply inside a <think> block."""
    return prompt.rstrip().endswith(OPEN)


def closed(prompt: str) -> bool:
    """Whether a rendered prompt ends just after a closed <think> block (Qwen3's
    enable_thinking false): its reply will not reason."""
    return prompt.rstrip().endswith(CLOSE)


def split(text: str, opened: bool) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole reply; None for a part it does not have."""
    body = text.lstrip()
    if body.startswith(OPEN):
        opened, text = True, body[len(OPEN):]
    if not opened:
        return None, text
    reasoning, closed, content = text.partition(CLOSE)
    return reasoning.strip() or None, (content.lstrip() or None) if closed else None


class ReasoningStream:
    """A streamed reply cut into its reasoning and content pieces as it comes. Text that may
    be the start of a tag is held until the next piece says what it is."""

    def __init__(self, opened: bool):
        self.state = "reasoning" if opened else "start"   # start: <think> may still come
        self.held = ""

    def step(self, piece: str) -> tuple[str, str]:
        """(reasoning, content) to send for this piece."""
        self.held += piece
        reasoning = content = ""
        while self.held:
            if self.state == "start":
                body = self.held.lstrip()
                if OPEN.startswith(body) and len(body) < len(OPEN):
                    break                         # blanks, or the tag's first characters
                if body.startswith(OPEN):
                    self.state, self.held = "reasoning", body[len(OPEN):].lstrip()
                    continue
                self.state = "content"
            if self.state == "reasoning":
                at = self.held.find(CLOSE)
                if at >= 0:
                    reasoning += self.held[:at]
                    self.state, self.held = "after", self.held[at + len(CLOSE):]
                    continue
                keep = partial_suffix(self.held, CLOSE)
                reasoning += self.held[:len(self.held) - keep]
                self.held = self.held[len(self.held) - keep:]
                break
            if self.state == "after":             # the blanks between </think> and the answer
                self.held = self.held.lstrip()
                if not self.held:
                    break
                self.state = "content"
            content += self.held
            self.held = ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is still held, once the reply has ended."""
        held, self.held = self.held, ""
        if self.state == "reasoning":
            return held, ""
        return "", held.lstrip() if self.state == "after" else held
