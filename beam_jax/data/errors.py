"""The one exception the data pipeline raises for bad input, always naming where the problem is."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad input data. The message starts with ``<file>[:line N | row N]: `` and names the field.

    Attributes:
        path: the file (or directory) the problem is in.
        where: ``"line 12"``, ``"row 3"``, ``"byte 1042"`` or ``None`` for the whole file.
        field: the field at fault (``"text"``, ``"messages[1].content"``) or ``None``.
    """

    def __init__(self, path, message: str, where: str | None = None, field: str | None = None):
        self.path = str(path)
        self.where = where
        self.field = field
        loc = self.path if where is None else f"{self.path}: {where}"
        if field is not None:
            message = f"field {field!r}: {message}"
        super().__init__(f"{loc}: {message}")
