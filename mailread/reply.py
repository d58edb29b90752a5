"""What the sender wrote in this message: the text less its quoted history and its signature.

Works on lines. The quoted history starts at the first *cut*: an attribution line ("On … wrote:"
and its translations, maybe wrapped over two lines) that is not followed by quoted lines, an
Outlook header block (``From:``/``Sent:``/``To:``/``Subject:`` in the client's language), an
``-----Original Message-----`` line, or a forwarded-message marker. ``>`` blocks are taken out
wherever they are, with the attribution just above them, so bottom-posted and interleaved
replies keep the sender's own lines. Then the signature goes: from a ``-- `` line, a mobile
"Sent from my …" line, or a sign-off line near the end ("Best regards," and its translations).

HTML-only mail loses its quote containers (Gmail's, Outlook's, Apple Mail's, Thunderbird's,
Yahoo's) in the tree before it becomes text.

No library does all of this: the measurement is in docs/BENCHMARKS.md ("Reply text").
"""

from __future__ import annotations

import re

from mailread.html_text import html_to_text

# An attribution line, wrapped or not, in the languages mail clients write them. Each ends
# the line; the checks run on one line and on two lines joined (Gmail wraps at 78).
_ATTRIBUTIONS = [
    r"^(on|am|le|el|em|il|op|den|dne|w dniu)\b.{4,300}"
    r"\b(wrote|schrieb|a écrit|escribió|escreveu|ha scritto|schreef|skrev|napisał|napsal)\s*:$",
    r"^.{2,300}\b(wrote|schrieb|a écrit|escribió|escreveu|ha scritto|schreef|написал\(а\)|"
    r"написал|написала|пишет)\s*:$",
    r"^.{2,200}\s(schrieb am|a écrit le|escribió el|escreveu em|ha scritto il)\b.{2,120}:$",
    # Dutch and Scandinavian Gmail put the verb before the name: "Op … schreef Anna <a@b>:".
    r"^(op|den|på)\b.{4,200}\s(schreef|skrev)\s.{1,200}:$",
    r"^.{0,200}(写道|寫道)\s*[：:]$",
    r"^.{0,200}(さんは書きました|は書きました|のメッセージ)\s*[：:]$",
    r"^.{0,200}(wrote|書きました)\s*[：:]$",
    # Gmail in Russian and Japanese: a date, a name and an address, then only a colon.
    r"^(пн|вт|ср|чт|пт|сб|вс),\s.{4,120}<[^<>\s]+@[^<>\s]+>:$",
    r"^\d{4}年\d{1,2}月\d{1,2}日.{0,120}<[^<>\s]+@[^<>\s]+>\s*[：:]$",
    r"^\d{1,2} \S+ \d{4} г\., в \d{1,2}:\d{2}, .{1,200}:$",
]
_ATTRIBUTION = re.compile("|".join(f"(?:{p})" for p in _ATTRIBUTIONS), re.IGNORECASE)

# Lines that begin forwarded or quoted history outright: a marker alone on its line (between
# dashes or not), or between dashes with the forwarded header run on after it (Yahoo's plain
# part: "----- Forwarded Message ----- From: … To: …").
_MARKERS = (
    r"original message|forwarded message|begin forwarded message|"
    r"ursprüngliche nachricht|weitergeleitete nachricht|"
    r"message d'origine|message original|message transféré|"
    r"mensaje original|mensaje reenviado|"
    r"mensagem original|mensagem encaminhada|"
    r"messaggio originale|messaggio inoltrato|"
    r"oorspronkelijk bericht|origineel bericht|doorgestuurd bericht|"
    r"исходное сообщение|пересылаемое сообщение|пересланное сообщение|"
    r"原始邮件|原始郵件|转发的邮件|轉寄的郵件|原始メッセージ|転送されたメッセージ|転送メッセージ"
)
_SEPARATORS = re.compile(
    rf"^\s*(-{{2,}}\s*)?({_MARKERS})\s*(-{{2,}}\s*)?:?\s*$|^\s*-{{2,}}\s*({_MARKERS})\s*-{{2,}}",
    re.IGNORECASE,
)
_RULE = re.compile(r"^\s*(_{10,}|-{10,}|={10,})\s*$")

# The fields of Outlook's header block, by the names each language gives them.
_FROM = r"from|von|de|da|van|от|发件人|寄件者|差出人|送信者"
_OTHER = (r"sent|date|to|cc|subject|gesendet|datum|an|betreff|envoyé|date|à|objet|enviado|"
          r"fecha|para|asunto|assunto|data|inviato|a|oggetto|verzonden|aan|onderwerp|"
          r"отправлено|дата|кому|тема|копия|发送时间|日期|收件人|主题|抄送|寄件日期|收件者|主旨|"
          r"送信日時|日時|宛先|件名|cc")
_FIELD_FROM = re.compile(rf"^\s*\**\s*({_FROM})\s*\**\s*[:：]", re.IGNORECASE)
_FIELD_OTHER = re.compile(rf"^\s*\**\s*({_OTHER})\s*\**\s*[:：]", re.IGNORECASE)

# Signatures: RFC 3676's delimiter (and the "--" clients leave when they trim its space),
# a mobile client's line, or a sign-off line.
_SIG_DELIMITER = re.compile(r"^-- ?$")
_MOBILE = re.compile(
    r"^\s*((sent from|sent with|sent via|get outlook for|envoyé de|envoyé depuis|enviado desde|"
    r"enviado do|enviado de|von meinem|gesendet von|inviato da|verstuurd vanaf|verzonden vanaf|"
    r"отправлено с)\b.{0,80}"
    # Chinese and Japanese have no word boundary before "iPhone": no \b there.
    r"|(发自我的|从我的|來自我的|发自|寄自我的).{0,40}|.{0,30}(から送信|より送信)\s*)$",
    re.IGNORECASE,
)
_SIGN_OFFS = (
    "best regards|kind regards|warm regards|regards|best wishes|all the best|best|cheers|thanks|"
    "thank you|many thanks|thanks again|thanks in advance|sincerely|yours|yours sincerely|"
    "mit freundlichen grüßen|mit freundlichen grüssen|freundliche grüße|viele grüße|beste grüße|"
    "liebe grüße|herzliche grüße|schöne grüße|grüße|gruß|lg|vg|mfg|danke|vielen dank|"
    "cordialement|bien cordialement|bien à vous|amicalement|salutations|merci|bonne journée|"
    "saludos|un saludo|saludos cordiales|atentamente|gracias|¡gracias|un abrazo|muchas gracias|"
    "atenciosamente|abraços|abraço|um abraço|grande abraço|obrigado|obrigada|cumprimentos|att|at\\.te|"
    "cordiali saluti|distinti saluti|saluti|un saluto|grazie|grazie mille|a presto|"
    "met vriendelijke groet|met vriendelijke groeten|vriendelijke groet|groetjes|groeten|"
    "hartelijke groet|bedankt|dank je|dank u|"
    "с уважением|спасибо|с наилучшими пожеланиями|всего доброго|"
    "此致|谢谢|谢谢！|祝好|顺祝商祺|敬上|"
    "よろしくお願いいたします|よろしくお願いします|以上、よろしくお願いいたします|以上です"
)
_SIGN_OFF = re.compile(rf"^\s*({_SIGN_OFFS})\s*[,.!。！、]*\s*$", re.IGNORECASE)
SIGN_OFF_TAIL = 5  # lines a sign-off may have after it: a name, a title, a company, a phone


def reply_text(text: str, html: str = "") -> str | None:
    """What the sender wrote in ``text`` (or, when there is none, in ``html``); None when the
    message has no text at all."""
    if not text.strip() and html.strip():
        text = html_to_text(html, drop_quotes=True)
    if not text.strip():
        return None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    own = _without_quotes(lines)
    own = _without_signature(own)
    return "\n".join(own).strip()


def without_signature(text: str) -> str:
    """``text`` less its signature (the second half of reply_text on its own: the benchmark
    gives every library's output the same step, to compare quote removal alone)."""
    return "\n".join(_without_signature(text.split("\n"))).strip()


def _without_quotes(lines: list[str]) -> list[str]:
    kept: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        if _is_quoted(line):
            index += 1
            continue
        span = _attribution_span(lines, index)
        if span:
            after = _next_content(lines, index + span)
            if after is not None and _is_quoted(lines[after]):
                index += span  # its quote block goes by the rule above; the text below stays
                continue
            break  # an attribution over unquoted history: the rest is history
        if _starts_history(lines, index):
            break
        kept.append(line)
        index += 1
    return kept


def _is_quoted(line: str) -> bool:
    return line.lstrip(" ").startswith(">")


def _attribution_span(lines: list[str], index: int) -> int:
    """1 or 2 (the lines the attribution takes at ``index``), or 0."""
    line = lines[index].strip()
    if not line or len(line) > 400:
        return 0
    if _ATTRIBUTION.match(line):
        return 1
    if index + 1 < len(lines) and not _is_quoted(lines[index + 1]):
        joined = f"{line} {lines[index + 1].strip()}"
        if lines[index + 1].strip() and _ATTRIBUTION.match(joined) and not line.endswith(":"):
            return 2
    return 0


def _starts_history(lines: list[str], index: int) -> bool:
    line = lines[index]
    if _SEPARATORS.match(line):
        return True
    if _RULE.match(line):
        following = _next_content(lines, index + 1)
        return following is not None and bool(_FIELD_FROM.match(lines[following]))
    if _FIELD_FROM.match(line):
        # A header block: "From:" and, within the next few lines, the other fields.
        window = [l for l in lines[index + 1:index + 6] if l.strip()]
        return sum(1 for l in window if _FIELD_OTHER.match(l)) >= 2
    return False


def _next_content(lines: list[str], start: int) -> int | None:
    for index in range(start, len(lines)):
        if lines[index].strip():
            return index
    return None


def _without_signature(lines: list[str]) -> list[str]:
    for index, line in enumerate(lines):
        if _SIG_DELIMITER.match(line) or _MOBILE.match(line):
            # Never cut a message down to nothing; a sign-off may still stand above the cut
            # ("Bien à vous, / Gaëlle / Envoyé depuis Yahoo Mail").
            lines = _trimmed(lines[:index]) or lines
            break
    content = [i for i, line in enumerate(lines) if line.strip()]
    for position, index in enumerate(content):
        if len(content) - position - 1 > SIGN_OFF_TAIL:
            continue
        if _SIGN_OFF.match(lines[index]) and position > 0:
            tail = [lines[i] for i in content[position + 1:]]
            if all(len(line.strip()) <= 60 for line in tail):
                return _trimmed(lines[:index])
    return lines


def _trimmed(lines: list[str]) -> list[str]:
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines
