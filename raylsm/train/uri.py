"""Tracking URIs and their secrets: what is shown and stored (:func:`redact_uri`), what is connected to
(:func:`real_uri`), and how another process gets the credentialed URI (:func:`secret_env`). No MLflow import."""

from __future__ import annotations

import logging
import os
import re
import traceback


# The full tracking URI when it carries credentials: processes get it from their environment (a local cluster's
# processes inherit it; the training workers set it from their actor's arguments, never from a runtime env, which
# Ray logs to disk), so that jobs, configs and checkpoints only ever hold the redacted one.
SECRET_URI_ENV = "RAYLSM_TRACKING_URI"


def has_secret(uri: str) -> bool:
    """Whether ``uri`` carries anything :func:`redact_uri` removes (userinfo, query values, a fragment)."""
    return redact_uri(uri) != uri


def secret_env(uri: str) -> dict[str, str]:
    """The environment that lets another process turn the redacted ``uri`` back into the real one ({} if none needed)."""
    return {SECRET_URI_ENV: uri} if has_secret(uri) else {}


def real_uri(uri: str) -> str:
    """The URI to connect with: ``uri`` itself, or the credentialed one in the environment whose redaction it is.
    A credentialed URI returned here is also masked in every log record this process makes from now on."""
    if not uri:
        return uri
    if has_secret(uri):
        guard_logs(uri)
        return uri
    full = os.environ.get(SECRET_URI_ENV, "")
    if full and redact_uri(full) == uri:
        guard_logs(full)
        return full
    return uri


def scrub(text: str, uri: str) -> str:
    """``text`` with every secret part of ``uri`` (password, user, query values, fragment) and every URL's userinfo
    replaced by ``***``."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    try:
        parts = urlsplit(uri)
        secrets = [parts.password, parts.username, parts.fragment, *(v for _, v in parse_qsl(parts.query))]
    except ValueError:
        return text
    for secret in sorted({s for s in secrets if s and len(s) > 2}, key=len, reverse=True):
        for form in {secret, unquote(secret)}:
            text = text.replace(form, "***")
    return _USERINFO.sub(r"\1***@", text)  # and any URL's userinfo, however short


def redact_uri(uri: str) -> str:
    """No credentials in params, files or output: userinfo -> ``***@``, every query value -> ``***``, no fragment.

    ``https://alice:pw@host:5000/api?token=t&x=1#f`` -> ``https://***@host:5000/api?token=***&x=***``.
    """
    from urllib.parse import parse_qsl, urlencode, urlsplit

    if not uri:
        return uri
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:  # not parseable as a URL: nothing of it is shown
        return "***"
    netloc = parts.netloc
    if "@" in netloc:
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"***@{host}{f':{port}' if port else ''}"
    query = parts.query
    if query:
        query = urlencode([(k, "***") for k, _ in parse_qsl(query, keep_blank_values=True)], safe="*")
        query = query or "***"
    if netloc == parts.netloc and query == parts.query and "#" not in uri:
        return uri
    base = uri.split("#", 1)[0].split("?", 1)[0]  # urlunsplit would turn sqlite://// into sqlite://
    if netloc != parts.netloc:
        base = base.replace(parts.netloc, netloc, 1)  # the first occurrence is the one after "scheme://"
    return base + (f"?{query}" if query else "")


# Any URL's userinfo ("scheme://user:pw@"), whatever store it names.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@'\"]+@")
_GUARDED: set[str] = set()


def mask(text: str) -> str:
    """``text`` with every URL's userinfo and every secret part of each guarded URI replaced by ``***``."""
    for uri in tuple(_GUARDED):  # a copy: another thread may guard one more meanwhile
        text = scrub(text, uri)
    return _USERINFO.sub(r"\1***@", text)


def _masked_record_factory(make):
    def factory(*args, **kwargs):
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is left to logging's own error path
            return record
        clean = mask(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            try:
                text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            except Exception:  # an exception that cannot be formatted: nothing of it is printed
                text = "(traceback not shown)"
            record.exc_text = mask(text)  # what Formatter prints in place of formatting exc_info itself
        return record

    factory.raylsm_masks = True
    return factory


def guard_logs(uri: str) -> None:
    """Mask ``uri``'s secrets (and any URL's userinfo) in every log record this process makes from now on: MLflow's
    own messages (a failed request, a retry, the system-metrics thread) quote the URL they called, credentials and all.
    Installed once per process as a ``logging`` record factory, so it covers loggers and handlers made later too."""
    if not has_secret(uri):
        return
    _GUARDED.add(uri)
    if not getattr(logging.getLogRecordFactory(), "raylsm_masks", False):
        logging.setLogRecordFactory(_masked_record_factory(logging.getLogRecordFactory()))
