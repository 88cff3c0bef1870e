"""What text may go into a response header, and the small parsers for numbers that
come from requests and upstreams.

A request value (`ns`, `n`, `last`) or an upstream's value (`Retry-After`, `Link`,
`OCI-Filters-Applied`, a media type) reaches one of our headers only through these
checks; `api/middleware.py`'s prepare hook applies `header_safe` to every header as a last
resort.
"""

from __future__ import annotations

# Printable ASCII and horizontal tab: what RFC 9110 field values allow, minus obs-text
# (bytes above 0x7f, which clients decode inconsistently). Checked with str methods (in
# C): every response runs this on every header.
# Longer header values are not ours: the longest we make is a Link with a 255-byte
# name and a 512-byte `last`, percent-encoded.
HEADER_VALUE_MAX = 4096


def header_safe(value: str) -> bool:
    """True if `value` can be sent as a header value as it is."""
    # An ASCII string is printable exactly when every character is in 0x20-0x7e.
    return (
        len(value) <= HEADER_VALUE_MAX
        and value.isascii()
        and (value.isprintable() or value.replace("\t", " ").isprintable())
    )


def ascii_digits(text: str) -> bool:
    """`str.isdigit` accepts '²' and other digits `int` rejects; this does not."""
    return text.isascii() and text.isdigit()


def bounded_int(text: str, limit: int) -> int | None:
    """A non-negative decimal number capped at `limit`, None if `text` is not one.

    Leading zeros are dropped before the value is read, so a 5000-digit number (which
    `int` refuses above 4300 digits) is only ever the cap.
    """
    if not ascii_digits(text):
        return None
    significant = text.lstrip("0") or "0"
    if len(significant) > len(str(limit)):
        return limit
    return min(int(significant), limit)


def retry_after_seconds(text: str | None, default: int) -> str:
    """An upstream's Retry-After, passed on only in its delay-seconds form."""
    if text is None:
        return str(default)
    seconds = bounded_int(text.strip(), 86_400)
    return str(default if seconds is None else seconds)
