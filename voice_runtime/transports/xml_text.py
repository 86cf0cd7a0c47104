"""Text that is safe inside an XML 1.0 document (TwiML answers, ``<Parameter>`` values).

XML 1.0 cannot carry most C0 control characters, lone surrogates or U+FFFE/U+FFFF, even as
character references, and ElementTree writes them through unescaped: one NUL in an SMS reply
or a caller-supplied parameter would make the whole TwiML answer unparseable for Twilio.
"""

from __future__ import annotations

import re

__all__ = ["xml_safe"]

# Everything outside XML 1.0's Char production: #x9 | #xA | #xD | [#x20-#xD7FF] |
# [#xE000-#xFFFD] | [#x10000-#x10FFFF].
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_safe(text: str) -> str:
    """``text`` without the characters XML 1.0 cannot carry (NUL, \\x01, \\x0b, ...)."""
    return _NOT_XML_CHAR.sub("", text)
