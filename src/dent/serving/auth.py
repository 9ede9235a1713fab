"""The bearer token: read once at start from an environment variable or a file, never logged, compared in
constant time."""

from __future__ import annotations

import hmac
import os
from typing import Optional

from dent.errors import ConfigError
from dent.serving.config import ServeSection

#: Shorter tokens are refused: a guessable token on a reachable port is no protection.
MIN_TOKEN_LENGTH = 16


def read_token(section: ServeSection) -> Optional[bytes]:
    """The token ``section`` names (``None``: none configured); a named source that is missing, empty or too
    short is an error that names the source, never its content."""
    if section.token_file is not None:
        where = f"serve.token_file {str(section.token_file)!r}"
        try:
            lines = section.token_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: cannot read the token: {getattr(exc, 'strerror', None) or exc}") from None
        token = lines[0].strip() if lines else ""
    elif section.token_env is not None:
        where = f"serve.token_env: the environment variable {section.token_env!r}"
        token = os.environ.get(section.token_env, "").strip()
    else:
        return None
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"{where} holds no token of at least {MIN_TOKEN_LENGTH} characters "
                          f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token.encode()


def authorized(header: Optional[str], token: bytes) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (compared with hmac.compare_digest)."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)
