"""Moved: the archive format (writer and readers) is :mod:`common.archive` (docs/DESIGN.md §8.1), the
training pairs of several archives :mod:`trainer.pairs`.

Kept only for ``trainer/train_codec.py``, which imports ``iter_episodes`` from here; delete this module
once it imports from :mod:`common.archive`.
"""

from common.archive import iter_episodes

__all__ = ["iter_episodes"]
