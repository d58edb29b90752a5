"""HTML mail as text, for reading what it says (the stored HTML itself is never changed).

lxml parses whatever the HTML is (it recovers from any markup, like a browser) and inscriptis
lays it out as text. ``drop_quotes`` first takes out what mail clients put around quoted
history, so an HTML-only reply reads as the sender's own text.
"""

from __future__ import annotations

import lxml.etree
import lxml.html
from inscriptis import Inscriptis
from inscriptis.css_profiles import CSS_PROFILES
from inscriptis.model.config import ParserConfig

HTML_LIMIT = 2 * 1024 * 1024  # characters of HTML read: enough for any person's reply

# Containers that hold quoted history (and only that).
_QUOTE_CONTAINERS = (
    "//blockquote"  # Apple Mail, Thunderbird (type=cite), Gmail (class=gmail_quote), others
    " | //div[contains(concat(' ', normalize-space(@class), ' '), ' gmail_quote ')]"
    " | //div[contains(@class, 'moz-cite-prefix')] | //div[contains(@class, 'moz-forward-container')]"
    " | //div[contains(@class, 'yahoo_quoted')] | //div[contains(@class, 'protonmail_quote')]"
    " | //div[contains(@class, 'zmail_extra')] | //div[@id='mail-editor-reference-message-container']"
)
# Markers after which everything, to the end of the document, is history (Outlook's).
_HISTORY_STARTS = (
    "//*[@id='divRplyFwdMsg' or @id='x_divRplyFwdMsg' or @id='appendonsend'"
    " or @id='x_appendonsend' or @id='stopSpelling']"
    " | //div[contains(translate(@style, 'ABCDEF ', 'abcdef'), 'border-top:solid#e1e1e1')"
    " or contains(translate(@style, 'ABCDEF ', 'abcdef'), 'border-top:solid#b5c4df')]"
)
# "strict": inline elements add no spaces of their own ("relaxed" pads each <span>, which
# splits 発行後、<span>PDF</span>で and any word a client styled in parts).
_CONFIG = ParserConfig(css=CSS_PROFILES["strict"], display_links=False, display_images=False)


def html_to_text(html: str, *, drop_quotes: bool = False) -> str:
    try:
        tree = lxml.html.document_fromstring(html[:HTML_LIMIT])
    except (lxml.etree.ParserError, ValueError):
        return ""  # nothing but markup, or no document at all
    if drop_quotes:
        _drop_history(tree)
    lines = Inscriptis(tree, _CONFIG).get_text().split("\n")
    return "\n".join(line.strip() for line in lines)


def _drop_history(tree) -> None:
    starts = tree.xpath(_HISTORY_STARTS)
    if starts:
        _cut_from(starts[0])
    for node in tree.xpath(_QUOTE_CONTAINERS):
        if node.getparent() is not None:
            _remove(node)


def _cut_from(node) -> None:
    """Remove ``node`` and everything after it in document order."""
    parent = node.getparent()
    for sibling in [node, *node.itersiblings()]:
        parent.remove(sibling)  # with its tail: history too
    while parent is not None and parent.tag not in ("body", "html"):
        for sibling in list(parent.itersiblings()):
            parent.getparent().remove(sibling)
        parent.tail = None
        parent = parent.getparent()


def _remove(node) -> None:
    """Drop ``node`` but keep the text that follows it (lxml keeps that in its tail)."""
    parent = node.getparent()
    tail = node.tail
    if tail and tail.strip():
        previous = node.getprevious()
        if previous is not None:
            previous.tail = (previous.tail or "") + tail
        else:
            parent.text = (parent.text or "") + tail
    parent.remove(node)
