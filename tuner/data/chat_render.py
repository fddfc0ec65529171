"""Rendering conversations with a tokenizer's chat template, and finding the assistant's spans.

Rendering every row through Jinja is the slowest part of data preparation, so conversations are
rendered from a *skeleton*: for each sequence of roles that recurs, the template is rendered once
with sentinel contents, and later rows with that role sequence are assembled by string
concatenation. The skeleton is trusted only when the template passes contents through verbatim
(sentinels with surrounding whitespace survive unchanged), its source shows no content-dependent
logic, and it reproduces the first rows of its role sequence, which are rendered the slow way
(as is one row in every 997 after that). Otherwise that role sequence renders row by row.

Assistant spans (the characters that carry loss) are found without `{% generation %}` markers:
a turn starts where the conversation rendered up to it with a generation prompt ends, and ends
where the conversation rendered through it stops agreeing with the full render, which takes in
the end-of-turn marker (and, for the last turn, what the template appends, e.g. an EOS token).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

Span = tuple[int, int]
# Template constructs that make the rendered text depend on a message's content.
_CONTENT_SENSITIVE = re.compile(
    r"content['\"]?\]?\s*(\|\s*\w|\.\w)|\bin\s+(message\[['\"]content['\"]\]|content)\b"
    r"|content['\"]?\]?\s*(==|!=|is\s+not\s+string|is\s+string)"
)
_VERIFY_FIRST = 3  # rows per role sequence checked against the slow render
_VERIFY_EVERY = 997  # then one row in this many


class TemplateNotPrefixStable(ValueError):
    """The template renders a conversation's prefix differently inside the whole conversation."""


class TemplateDropsTurn(ValueError):
    """The template leaves a message out (e.g. Phi-3's has no place for `tool` turns)."""

    def __init__(self, role: str):
        super().__init__(f"the chat template leaves out {role} turns")
        self.role = role


@dataclass(frozen=True)
class _Skeleton:
    pieces: tuple[str, ...]  # text around the contents: pieces[0] c0 pieces[1] c1 ... pieces[n]
    spans: tuple[tuple[int, int, int], ...]  # (message index, start delta from content start, end delta from content end)


class ChatRenderer:
    """Renders conversations to text plus assistant spans, fast where the template allows."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        template = tokenizer.chat_template or ""
        self.skeletons_allowed = not _CONTENT_SENSITIVE.search(template)
        self._compiled = self._direct_template(template)
        self._skeletons: dict[tuple[str, ...], _Skeleton | None] = {}
        self._seen: dict[tuple[str, ...], int] = {}
        self._samples: dict[tuple[str, ...], list[tuple[list[dict], tuple[str, list[Span]]]]] = {}

    def render(self, messages: list[dict]) -> tuple[str, list[Span]]:
        """The conversation's text and the character spans of its assistant turns."""
        roles = tuple(m["role"] for m in messages)
        count = self._seen[roles] = self._seen.get(roles, 0) + 1
        if not self.skeletons_allowed or count <= _VERIFY_FIRST:
            result = self.render_slow(messages)
            if self.skeletons_allowed:  # kept to check the skeleton against once it is built
                self._samples.setdefault(roles, []).append((messages, result))
            return result
        skeleton = self._skeleton(roles)
        if skeleton is None:
            return self.render_slow(messages)
        result = _assemble(skeleton, messages)
        if count % _VERIFY_EVERY == 0 and self.render_slow(messages) != result:
            self._skeletons[roles] = None  # this role sequence renders row by row from now on
            return self.render_slow(messages)
        return result

    def render_slow(self, messages: list[dict]) -> tuple[str, list[Span]]:
        """Render with the template; spans by prefix rendering (two renders per assistant turn)."""
        full = self._apply(messages, generation_prompt=False)
        cursor = 0
        for message in messages:  # every content must appear, in order: none silently vanishes
            found = full.find(message["content"], cursor)
            if found < 0:
                raise TemplateDropsTurn(message["role"])
            cursor = found + len(message["content"])
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self._apply(messages[:i], generation_prompt=True)
            if not full.startswith(prefix):
                raise TemplateNotPrefixStable(f"turn {i + 1}")
            end = len(full) if i == len(messages) - 1 else _common_prefix_len(
                self._apply(messages[: i + 1], generation_prompt=False), full)
            spans.append((len(prefix), end))
        return full, spans

    def _apply(self, messages: list[dict], generation_prompt: bool) -> str:
        if self._compiled is None:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return self._compiled.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=generation_prompt, **self.tokenizer.special_tokens_map)

    def _direct_template(self, template: str):
        """transformers' own compiled template (same sandbox, filters and globals), rendered directly.

        `apply_chat_template` deep-copies and normalises the messages on every call, which was
        ~80% of preparation time on long multi-turn data (every assistant turn renders prefixes).
        tuner's messages are already plain {role, content} dicts, so the copy adds nothing; the
        direct render is used only if it agrees with `apply_chat_template` on probe conversations.
        """
        if not template:
            return None
        from transformers.utils.chat_template_utils import _compile_jinja_template

        try:
            compiled = _compile_jinja_template(template)
        except Exception:  # a template transformers cannot compile fails later, row by row
            return None
        probes = [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                  [{"role": "system", "content": "s"}, {"role": "user", "content": "c"},
                   {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}]]
        for probe in probes:
            for generation_prompt in (False, True):
                try:
                    direct = compiled.render(messages=probe, tools=None, documents=None,
                                             add_generation_prompt=generation_prompt, **self.tokenizer.special_tokens_map)
                    reference = self.tokenizer.apply_chat_template(probe, tokenize=False,
                                                                   add_generation_prompt=generation_prompt)
                except Exception:
                    return None
                if direct != reference:
                    return None
        return compiled

    def _skeleton(self, roles: tuple[str, ...]) -> _Skeleton | None:
        """The role sequence's skeleton, built once it recurs and trusted only if it reproduces
        the rows already rendered the slow way."""
        if roles not in self._skeletons:
            skeleton = self._build_skeleton(roles)
            samples = self._samples.pop(roles, [])
            if skeleton and any(_assemble(skeleton, m) != result for m, result in samples):
                skeleton = None
            self._skeletons[roles] = skeleton
        return self._skeletons[roles]

    def _build_skeleton(self, roles: tuple[str, ...]) -> _Skeleton | None:
        sentinels = [f" \n\u27e6tuner-{i}\u27e7\n " for i in range(len(roles))]
        messages = [{"role": role, "content": s} for role, s in zip(roles, sentinels, strict=True)]
        try:
            text, spans = self.render_slow(messages)
        except Exception:  # any template failure: let the slow path report it row by row
            return None
        positions = [text.find(s) for s in sentinels]
        if any(p < 0 or text.count(s) != 1 for p, s in zip(positions, sentinels, strict=True)) or positions != sorted(positions):
            return None
        pieces, cursor = [], 0
        for position, sentinel in zip(positions, sentinels, strict=True):
            pieces.append(text[cursor:position])
            cursor = position + len(sentinel)
        pieces.append(text[cursor:])
        assistant = [i for i, role in enumerate(roles) if role == "assistant"]
        deltas = []
        for index, (start, end) in zip(assistant, spans, strict=False):  # a template may leave a turn out
            content_start, content_end = positions[index], positions[index] + len(sentinels[index])
            if start > content_start or end < content_end:
                return None
            deltas.append((index, start - content_start, end - content_end))
        return _Skeleton(tuple(pieces), tuple(deltas))


def _assemble(skeleton: _Skeleton, messages: list[dict]) -> tuple[str, list[Span]]:
    parts, starts, cursor = [], [], 0
    for piece, message in zip(skeleton.pieces, messages, strict=False):  # one piece more: the tail
        parts.append(piece)
        cursor += len(piece)
        starts.append(cursor)
        parts.append(message["content"])
        cursor += len(message["content"])
    parts.append(skeleton.pieces[-1])
    spans = [(starts[i] + d_start, starts[i] + len(messages[i]["content"]) + d_end)
             for i, d_start, d_end in skeleton.spans]
    return "".join(parts), spans


def _common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix (binary search over C-speed comparisons)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if b.startswith(a[:mid]):
            low = mid
        else:
            high = mid - 1
    return low
