"""Credentials out of everything featurize writes or prints.

Secrets are found by structure as well as by name: the user-info of a URL (`user:***@`), query
parameters whose name looks secret (a presigned URL's X-Amz-Signature, X-Amz-Credential, sig,
token ...), every value under a `headers` mapping, and any mapping key that names a secret
(key, secret, token, password, authorization, cookie ...). The redacted form is stable: the same
job with a changed password redacts to the same text, so _job.json's settings still compare equal.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict

MASK = "***"

# A mapping key or query parameter that names a secret. Harmless keys (anon, endpoint_url,
# region_name, use_ssl ...) match none of these words.
SECRET_NAME = re.compile(
    r"key|secret|token|passw|pwd|credential|session|auth|cookie|signature|^sig$|private|bearer"
    r"|googleaccessid", re.I)
_HEADERS = re.compile(r"headers$", re.I)  # headers, http_headers, extra_headers: every value secret

# scheme://USERINFO@ — the user-info stops at the authority's end (/ ? #), at white space and at
# the quotes that surround a URL in a message.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<info>[^/?#\s'\"<>@]*(?:@[^/?#\s'\"<>@]*)*)@")
# ?name=value or &name=value, in a URL or in any text that quotes one.
_QUERY = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&;#?\s'\"<>]+)=(?P<value>[^&;#\s'\"<>]*)")
# `Authorization: Basic ...`, `Cookie=...` written as text (an exception quoting a request).
_HEADER_TEXT = re.compile(r"(?P<name>\b(?:authorization|proxy-authorization|cookie|set-cookie|x-api-key)\b"
                          r"['\"]?\s*[:=]\s*['\"]?)"
                          r"(?P<value>[^'\",}\n]+)", re.I)


def is_secret_name(name: Any) -> bool:
    return bool(SECRET_NAME.search(str(name)))


def redact_text(text: str) -> str:
    """`text` with URL user-info, secret query values and header values masked."""
    if not isinstance(text, str) or not text:
        return text
    text = _USERINFO.sub(_mask_userinfo, text)
    text = _QUERY.sub(_mask_query, text)
    return _HEADER_TEXT.sub(lambda m: m.group("name") + MASK, text)


def _mask_userinfo(m: re.Match) -> str:
    user, colon, _password = m.group("info").partition(":")
    # With a password the user name stays readable; alone, the user part is often a token.
    return f"{m.group('scheme')}{user}:{MASK}@" if colon else f"{m.group('scheme')}{MASK}@"


def _mask_query(m: re.Match) -> str:
    if not is_secret_name(m.group("name")) or not m.group("value"):
        return m.group(0)
    return f"{m.group('sep')}{m.group('name')}={MASK}"


def redact(value: Any, secret: bool = False) -> Any:
    """A copy of a config-like value (mappings, lists, strings) with every secret masked."""
    if isinstance(value, dict):
        return {k: redact(v, secret or is_secret_name(k) or bool(_HEADERS.match(str(k))))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, secret) for v in value]
    if secret and value not in (None, "", False):
        return MASK
    return redact_text(value) if isinstance(value, str) else value


def redact_strings(value: Any) -> Any:
    """A copy with every string (not keys) passed through redact_text; for records whose keys
    are not options (counts by error type, timings)."""
    if isinstance(value, dict):
        return {k: redact_strings(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_strings(v) for v in value]
    return redact_text(value) if isinstance(value, str) else value


# The plan: a URI with credentials in it (a presigned manifest row, a source.uri with user-info)
# is planned, saved and written out in its masked form; the real one travels in the in-memory
# column FETCH_URI to the read stage only, and is never saved under OUT.
FETCH_URI = "fetch_uri"


def public_row(row: Dict[str, Any]) -> Dict[str, Any]:
    """A plan row with sample_id and uri masked; the real uri kept in FETCH_URI when it differs."""
    uri = redact_text(row["uri"])
    if uri == row["uri"]:
        return {**row, "sample_id": redact_text(row["sample_id"])}
    return {**row, "sample_id": redact_text(row["sample_id"]), "uri": uri, FETCH_URI: row["uri"]}


def saved_plan(plan):
    """The plan as OUT keeps it: without the real URIs."""
    return plan.drop_columns([FETCH_URI]) if FETCH_URI in plan.column_names else plan


def has_masked_uris(plan) -> bool:
    """True when some planned URI is masked and its real form is not at hand (a plan read back
    from OUT): then the source is listed again for it."""
    import pyarrow.compute as pc  # here: redact is imported by processes that never read a plan

    masked = pc.match_substring(plan["uri"], MASK)
    if FETCH_URI in plan.column_names:
        masked = pc.and_(masked, pc.fill_null(pc.equal(plan[FETCH_URI], ""), True))  # no real one
    return bool(pc.any(masked).as_py())


class RedactedError(Exception):
    """Base of featurize's own errors: their messages are printed, logged by Ray and stored in
    _job.json, and often quote a URI; the credentials in it are masked when the error is made."""

    def __init__(self, *args):
        super().__init__(*(redact_text(a) if isinstance(a, str) else a for a in args))


class _RedactingFilter(logging.Filter):
    """Masks credentials in a record's final text (its arguments are often URIs or exceptions)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact_text(record.getMessage()), None
        return True


def logger(name: str) -> logging.Logger:
    """A module's logger whose records carry no credentials."""
    log = logging.getLogger(name)
    if not any(isinstance(f, _RedactingFilter) for f in log.filters):
        log.addFilter(_RedactingFilter())
    return log
