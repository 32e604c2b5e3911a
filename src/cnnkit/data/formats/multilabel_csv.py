"""Multi-label CSV: one image per row, ``path,labels`` with the labels separated by ``;``.

::

    path,labels
    images/0001.jpg,cat;dog
    images/0002.jpg,dog
    images/0003.jpg,

The header row is optional (a first row reading ``path,labels`` is skipped). Paths are
relative to the CSV file's folder (absolute paths work too). An empty label cell means the
image has none of the labels, which is a valid multi-label target. A path that needs a comma
is quoted, as the ``csv`` module does it.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cnnkit.errors import DataError

HEADER = ("path", "labels")
SEPARATOR = ";"


@dataclass(frozen=True)
class LabeledImage:
    """One row: the image's resolved path and its labels (sorted, no duplicates)."""

    path: str
    labels: tuple[str, ...]


def read_multilabel_csv(path: str | Path, check_files: bool = True) -> list[LabeledImage]:
    """Read a ``path,labels`` CSV.

    Args:
        path: the CSV file.
        check_files: raise when a listed image does not exist (the row number is named).

    Returns:
        One :class:`LabeledImage` per non-empty row, in file order, with paths resolved
        against the CSV's folder.

    Raises:
        DataError: the file is missing or unreadable, a row has no path or more than two
            columns, or (with ``check_files``) a listed image does not exist.

    Examples:
        >>> rows = read_multilabel_csv("data/train.csv")
        >>> rows[0].labels
        ('cat', 'dog')
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"CSV file '{p}' does not exist" if not p.exists() else
                        f"'{p}' is a folder, not a CSV file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"CSV file '{p}' is unreadable ({type(e).__name__}); save it as UTF-8 "
                        "text") from None
    try:
        rows = list(csv.reader(text.splitlines()))
    except csv.Error as e:
        raise DataError(f"CSV file '{p}' is malformed ({e})") from None
    out: list[LabeledImage] = []
    for n, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue  # blank line
        if n == 1 and tuple(c.lower() for c in cells) == HEADER:
            continue
        if len(cells) > 2:
            raise DataError(f"row {n} of '{p}' has {len(cells)} columns; expected path,labels "
                            f"with the labels separated by '{SEPARATOR}' (quote a path that has a comma)")
        if not cells[0]:
            raise DataError(f"row {n} of '{p}' has no image path")
        image = Path(cells[0])
        image = image if image.is_absolute() else p.parent / image
        if check_files and not image.is_file():
            raise DataError(f"row {n} of '{p}': image '{image}' does not exist")
        labels = cells[1] if len(cells) == 2 else ""
        out.append(LabeledImage(str(image), tuple(sorted({s.strip() for s in labels.split(SEPARATOR)
                                                          if s.strip()}))))
    if not out:
        raise DataError(f"CSV file '{p}' lists no images; write one 'path,labels' row per image")
    return out


def write_multilabel_csv(path: str | Path, rows: Iterable[LabeledImage | tuple[str, Sequence[str]]],
                         relative: bool = True) -> None:
    """Write rows as a ``path,labels`` CSV with a header (atomically).

    Args:
        path: the CSV file to write.
        rows: :class:`LabeledImage` objects or ``(path, labels)`` pairs.
        relative: write paths relative to the CSV's folder when they are inside it.
    """
    import io

    from cnnkit.utils.io import write_text

    p = Path(path)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HEADER)
    for row in rows:
        image, labels = (row.path, row.labels) if isinstance(row, LabeledImage) else row
        bad = [lab for lab in labels if SEPARATOR in lab or not lab.strip()]
        if bad:
            raise DataError(f"label {bad[0]!r} cannot be written: labels must be non-empty and "
                            f"must not contain '{SEPARATOR}'")
        image = Path(image)
        if relative:
            try:
                image = image.absolute().relative_to(p.parent.absolute())
            except ValueError:
                pass
        writer.writerow([image.as_posix(), SEPARATOR.join(labels)])
    write_text(p, buf.getvalue())
