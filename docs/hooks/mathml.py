"""MkDocs hook: the pages' formulas as MathML, written at build time.

``pymdownx.arithmatex`` (generic mode) marks ``$…$`` and ``$$…$$`` in the Markdown; this hook
replaces each mark with the MathML that ``latex2mathml`` writes for it, which browsers render
themselves: no JavaScript, no font download and no CDN, so the site works offline. A formula that
latex2mathml cannot read fails the build, naming the page.
"""

from __future__ import annotations

import html
import re

from latex2mathml.converter import convert

BLOCK = re.compile(r'<div class="arithmatex">\s*\\\[(?P<tex>.*?)\\\]\s*</div>', re.S)
INLINE = re.compile(r'<span class="arithmatex">\\\((?P<tex>.*?)\\\)</span>', re.S)


def _mathml(tex: str, display: str, page) -> str:
    try:
        return convert(html.unescape(tex).strip(), display=display)
    except Exception as e:  # latex2mathml raises its own exceptions and plain ones
        raise SystemExit(f"{page.file.src_path}: formula {tex.strip()!r} is not LaTeX latex2mathml reads: {e}") from e


def on_page_content(content: str, page, **kwargs) -> str:
    content = BLOCK.sub(lambda m: '<div class="math">' + _mathml(m["tex"], "block", page) + "</div>", content)
    return INLINE.sub(lambda m: _mathml(m["tex"], "inline", page), content)
