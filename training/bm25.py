"""BM25 over a screenplay's lines: the one retriever of the canon index and of ``rolebot augment``.

Chinese (and Japanese, Korean) text has no spaces, so its terms are characters and character
bigrams: no word segmenter to install, and a name like 甄嬛 still matches as a bigram. Other
scripts are split into case-folded words. Scoring is the ``bm25s`` library (sparse matrices,
numpy only); this module only decides what a term is and keeps the top-k small and ordered.
"""

from __future__ import annotations

import logging
import os
import re
import sys

import numpy as np


# Runs of CJK ideographs, kana or hangul; else runs of other letters and digits (words).
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
_TERMS = re.compile(rf"[{_CJK}]+|(?:(?![{_CJK}])[^\W_])+")


def terms(text: str) -> list[str]:
    """The BM25 terms of ``text``: characters and bigrams of CJK runs, words elsewhere."""
    found: list[str] = []
    for match in _TERMS.finditer(text.casefold()):
        run = match.group()
        if re.match(rf"[{_CJK}]", run):
            found += list(run)
            found += [run[i:i + 2] for i in range(len(run) - 1)]
        else:
            found.append(run)
    return found


class BM25:
    """An in-memory BM25 index of ``docs``; ``top`` answers one query in microseconds."""

    K1, B = 1.5, 0.75

    def __init__(self, docs: list[str]):
        if "jax" not in sys.modules:
            # bm25s runs a JAX top-k when it is imported, where JAX is installed (Colab, many GPU
            # images): that starts JAX on the GPU, which takes 75% of its memory for itself, and
            # the model then does not fit. rolebot never uses JAX, nor bm25s's top-k: keep JAX
            # on the CPU.
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import bm25s

        # bm25s sets its own logger to DEBUG on import and logs every index build there.
        logging.getLogger("bm25s").setLevel(logging.WARNING)
        self.size = len(docs)
        self._index = bm25s.BM25(k1=self.K1, b=self.B)
        # bm25s needs at least one term a document; an empty line gets the empty term, which
        # no query holds.
        self._index.index([terms(doc) or [""] for doc in docs], show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """One score a document, in document order (0 where nothing matches)."""
        query_terms = [t for t in terms(query) if t in self._index.vocab_dict]
        if not query_terms or not self.size:
            return np.zeros(self.size, dtype=np.float32)
        return self._index.get_scores(query_terms)

    def top(self, query: str, k: int, excluded: np.ndarray | None = None) -> list[int]:
        """The indices of the (at most) ``k`` best documents that share a term with the query,
        best first, ties in document order; ``excluded`` (a bool mask) are never returned."""
        if k <= 0 or not self.size:
            return []
        scores = self.scores(query)
        if excluded is not None:
            scores = np.where(excluded, 0.0, scores)
        candidates = np.flatnonzero(scores > 0)
        if len(candidates) > k:
            candidates = candidates[np.argpartition(-scores[candidates], k - 1)[:k]]
        order = np.lexsort((candidates, -scores[candidates]))
        return [int(i) for i in candidates[order]]
