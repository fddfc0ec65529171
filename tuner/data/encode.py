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
        """Masks, length policy and labels for the whole chunk at once, on one character axis
        (each row's characters shifted past the previous row's), so per-row Python stays tiny."""
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        total = int(lengths.sum())
        ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=total)
        offsets = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in encodings)),
                              dtype=np.int64, count=2 * total).reshape(-1, 2)
        bases = np.zeros(len(rendered), dtype=np.int64)
        np.cumsum([len(text) + 1 for _, text, _ in rendered[:-1]], out=bases[1:])
        row_of_token = np.repeat(np.arange(len(rendered)), lengths)
        offsets += bases[row_of_token, None]
        spans = [(base + a, base + b) for base, (_, _, row_spans) in zip(bases.tolist(), rendered, strict=True) for a, b in row_spans]
        mask = _span_mask(offsets, spans)

        row_starts = np.zeros(len(rendered), dtype=np.int64)
        np.cumsum(lengths[:-1], out=row_starts[1:])
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


def _span_mask(offsets: np.ndarray, spans: list[Span]) -> np.ndarray:
    """1 for tokens whose characters lie wholly inside one of the (sorted, disjoint) spans."""
    if not spans or not len(offsets):
        return np.zeros(len(offsets), dtype=np.uint8)
    starts = np.fromiter((s for s, _ in spans), dtype=np.int64, count=len(spans))
    ends = np.fromiter((e for _, e in spans), dtype=np.int64, count=len(spans))
    which = np.searchsorted(starts, offsets[:, 0], side="right") - 1
    valid = which >= 0
    span_end = ends[np.clip(which, 0, None)]
    inside = valid & (offsets[:, 0] < span_end) & (offsets[:, 1] <= span_end)
    return inside.astype(np.uint8)
