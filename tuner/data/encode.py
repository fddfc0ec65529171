"""Conversations and texts -> token ids and loss masks, a chunk at a time.

Texts are tokenized in batches by the Rust tokenizer (which uses every core), and the loss mask
comes from character spans: a token carries loss when it lies wholly inside an assistant span
(or, for plain text, anywhere). Rows longer than `max_length` follow the length policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np
from jinja2 import TemplateError

from tuner.data.chat_render import ChatRenderer, Span, TemplateDropsTurn, TemplateNotPrefixStable
from tuner.spec.config_sections import LongRows

TOO_LONG = "longer than max_length"
NO_LABELS = "no tokens with loss"
NO_LABELS_AFTER_CUT = "no tokens with loss after truncation"
TEMPLATE_ERROR = "chat template error"
NOT_PREFIX_STABLE = "chat template not prefix-stable"

Sample = list[dict] | str  # chat messages, or plain text (loss on every token)


@dataclass
class EncodedChunk:
    """Encoded rows of one chunk, flat; plus what happened to the rows that were not kept."""

    ids: np.ndarray  # int32, all kept rows back to back
    mask: np.ndarray  # uint8, 1 where the token carries loss
    lengths: np.ndarray  # tokens per kept row
    full_lengths: list[int] = field(default_factory=list)  # tokens per rendered row before any cut
    dropped: list[tuple[int, str]] = field(default_factory=list)  # (row number, reason)
    long_rows: list[tuple[int, int]] = field(default_factory=list)  # (row number, tokens) over max_length
    truncated_tokens: int = 0


class Encoder:
    """Encodes samples with one tokenizer's chat template and a length policy."""

    def __init__(self, tokenizer, max_length: int, long_rows: LongRows):
        from tokenizers import Tokenizer

        self.renderer = ChatRenderer(tokenizer)
        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy we may reconfigure
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.eos = tokenizer.eos_token or ""
        self.max_length = max_length
        self.long_rows = long_rows

    def encode(self, samples: list[tuple[int, Sample]]) -> EncodedChunk:
        """Encode (row number, sample) pairs; rows that cannot be used are reported, not raised,
        except a row over max_length under the `error` policy, which the caller turns into an error."""
        chunk = EncodedChunk(np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros(0, np.int64))
        rendered: list[tuple[int, str, list[Span]]] = []
        for row, sample in samples:
            try:
                text, spans = self._render(sample)
            except TemplateNotPrefixStable:
                chunk.dropped.append((row, NOT_PREFIX_STABLE))
                continue
            except TemplateError:
                chunk.dropped.append((row, TEMPLATE_ERROR))
                continue
            except TemplateDropsTurn as drop:
                chunk.dropped.append((row, str(drop)))
                continue
            rendered.append((row, text, spans))
        if not rendered:
            return chunk
        encodings = self.backend.encode_batch([text for _, text, _ in rendered], add_special_tokens=False)
        self._collect(chunk, rendered, encodings)
        return chunk

    def _collect(self, chunk: EncodedChunk, rendered: list[tuple[int, str, list[Span]]], encodings) -> None:
        """Masks, length policy and labels for the whole chunk at once, on one token axis (each row's
        tokens after the previous row's), so per-row Python stays tiny."""
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        total = int(lengths.sum())
        ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=total)
        row_starts = np.zeros(len(rendered), dtype=np.int64)
        np.cumsum(lengths[:-1], out=row_starts[1:])
        mask = _span_mask(encodings, [spans for _, _, spans in rendered], row_starts.tolist(), lengths.tolist(), total)
        row_of_token = np.repeat(np.arange(len(rendered)), lengths)
        position = np.arange(total) - row_starts[row_of_token]
        long = lengths > self.max_length
        keep_row = ~long if self.long_rows == "drop" else np.ones(len(rendered), dtype=bool)
        keep_token = position < self.max_length
        labels_kept = np.bincount(row_of_token[keep_token & (mask == 1)], minlength=len(rendered))
        labels_full = np.bincount(row_of_token[mask == 1], minlength=len(rendered))
        rows = [row for row, _, _ in rendered]
        chunk.full_lengths = lengths.tolist()
        chunk.long_rows = [(rows[i], int(lengths[i])) for i in np.flatnonzero(long)]
        for i in range(len(rendered)):
            if not keep_row[i]:
                chunk.dropped.append((rows[i], TOO_LONG))
            elif labels_kept[i] == 0:
                chunk.dropped.append((rows[i], NO_LABELS_AFTER_CUT if labels_full[i] else NO_LABELS))
                keep_row[i] = False
        chunk.truncated_tokens = int((lengths[long & keep_row] - self.max_length).sum())
        selected = keep_token & keep_row[row_of_token]
        chunk.ids, chunk.mask = ids[selected], mask[selected]
        chunk.lengths = np.minimum(lengths, self.max_length)[keep_row]

    def _render(self, sample: Sample) -> tuple[str, list[Span]]:
        if isinstance(sample, str):
            text = sample + self.eos  # documents end with EOS so the model learns where they stop
            return text, [(0, len(text))]
        return self.renderer.render(sample)


def _span_mask(encodings, spans: list[list[Span]], row_starts: list[int], lengths: list[int], total: int) -> np.ndarray:
    """1 for the tokens whose characters lie wholly inside one of their row's (sorted, disjoint) spans.

    Each span's tokens are one run, found from its two ends with the encoding's own lookups
    (`char_to_token`, `token_to_chars`: a few calls a span) instead of reading every token's offsets
    into Python, which took 2.4 s of 14 s preparing 100k dolly rows (scripts/bench_data.py).
    """
    starts, ends = [], []
    for encoding, row_spans, row_start, length in zip(encodings, spans, row_starts, lengths, strict=True):
        for a, b in row_spans:
            lo, hi = _span_tokens(encoding, a, b, length)
            if hi > lo:
                starts.append(row_start + lo)
                ends.append(row_start + hi)
    if not starts:
        return np.zeros(total, dtype=np.uint8)
    edges = np.bincount(starts, minlength=total + 1) - np.bincount(ends, minlength=total + 1)
    return np.cumsum(edges[:total]).astype(np.uint8)


def _span_tokens(encoding, a: int, b: int, length: int) -> tuple[int, int]:
    """[lo, hi): the tokens with a <= start and end <= b, for offsets that never decrease. The lookups
    land on a token holding the span's first or last character; the loops step over neighbours that
    share it (a character split into byte tokens) or straddle the edge. A character no token holds
    (stripped by the normaliser or the offsets' trimming) falls back to a binary search."""
    chars = encoding.token_to_chars
    lo = encoding.char_to_token(a)
    if lo is None:
        lo = _first(lambda t: chars(t)[0] >= a, 0, length)
    else:
        while lo > 0 and chars(lo - 1)[0] >= a:
            lo -= 1
        while lo < length and chars(lo)[0] < a:
            lo += 1
    last = encoding.char_to_token(b - 1) if b > a else None
    if last is None:
        hi = _first(lambda t: chars(t)[0] >= b or chars(t)[1] > b, lo, length)
    else:
        hi = last + 1
        while hi < length and chars(hi)[0] < b and chars(hi)[1] <= b:
            hi += 1
        while hi > lo and chars(hi - 1)[1] > b:
            hi -= 1
    return lo, max(hi, lo)


def _first(holds, lo: int, hi: int) -> int:
    """The first index in [lo, hi) where `holds` (false, then true) is true; hi if none."""
    while lo < hi:
        mid = (lo + hi) // 2
        if holds(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
