"""Appending measured entries to one section of ``docs/benchmarks.md``.

Each benchmark script owns a ``## <section>`` of that file and appends its dated entries
there, leaving every other section as it is.
"""

from __future__ import annotations

from pathlib import Path


def append_entry(doc: Path, section: str, entry: str, intro: str = "") -> None:
    """Append ``entry`` at the end of ``section`` (a ``## `` heading) of ``doc``.

    A missing file starts as ``# Benchmarks``; a missing section is added at the end with
    ``intro`` as its first paragraph.
    """
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if section not in text:
        text = text.rstrip("\n") + f"\n\n{section}\n\n{intro.strip()}\n"
    start = text.index(section)
    nxt = text.find("\n## ", start + len(section))
    end = len(text) if nxt == -1 else nxt + 1
    body = text[start:end].rstrip("\n") + "\n\n" + entry.strip("\n") + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text[:start] + body + ("\n" + text[end:] if end < len(text) else ""))
