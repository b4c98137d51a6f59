"""Data sources behind one spec string, and the built-in offline datasets.

``open_data(spec)`` returns :class:`DataSplits` (train, val, test, classes, split_info);
``list_builtin()`` describes the built-in datasets.
"""

from recast.data.builtin import list_builtin
from recast.data.sources import DataSplits, open_data

__all__ = ["DataSplits", "list_builtin", "open_data"]
