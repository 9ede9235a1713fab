"""Downloading a public Google Drive file (how RobustBench distributes its checkpoints), standard library only.

Google Drive answers large files with an HTML "can't scan for viruses" page instead of the file; the real
download needs a confirmation token, found (depending on the year) in a ``download_warning`` cookie, in a
``download-form`` with hidden inputs, or in a ``confirm=`` link of that page. :func:`download_gdrive`
follows it, streams the file to a temporary file next to the destination and moves it into place only when
complete, so an interrupted download never leaves a half file under the final name.
"""

from __future__ import annotations

import html
import http.client
import http.cookiejar
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from dent.errors import DentError
from dent.models.checkpoints import looks_like_html

GDRIVE_URL = "https://drive.google.com/uc"
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"
CHUNK = 1 << 20
#: Errors that mean "no network / the server could not be reached or the connection broke".
NETWORK_ERRORS = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)


class DownloadError(DentError):
    """Google Drive answered, but not with the file (quota exceeded, permission, ...)."""


def gdrive_url(file_id: str) -> str:
    """The address for downloading ``file_id`` in a browser."""
    return f"https://drive.google.com/uc?export=download&id={file_id}"


def _open_url(opener: urllib.request.OpenerDirector, url: str, timeout: float) -> Any:
    """Open ``url`` (the one network call; tests replace it)."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    return opener.open(request, timeout=timeout)


def _confirmed(file_id: str, token: str) -> str:
    return f"{GDRIVE_URL}?" + urllib.parse.urlencode({"export": "download", "id": file_id, "confirm": token})


def _confirm_url(page: str, jar: http.cookiejar.CookieJar, file_id: str) -> str | None:
    """The confirmed download address from Google Drive's warning page, or None."""
    for cookie in jar:
        if cookie.name.startswith("download_warning"):
            return _confirmed(file_id, cookie.value)
    form = re.search(r"<form[^>]*\bid=\"download-form\"[^>]*>(.*?)</form>", page, re.S | re.I)
    if form:
        action = re.search(r"\baction=\"([^\"]+)\"", form.group(0), re.I)
        inputs = re.findall(r"<input[^>]*\bname=\"([^\"]+)\"[^>]*\bvalue=\"([^\"]*)\"", form.group(1), re.I)
        if action and inputs:
            params = {html.unescape(k): html.unescape(v) for k, v in inputs}
            return html.unescape(action.group(1)) + "?" + urllib.parse.urlencode(params)
    token = re.search(r"confirm=([0-9A-Za-z_-]+)", page)
    if token:
        return _confirmed(file_id, token.group(1))
    return None


def _page_title(page: str) -> str:
    match = re.search(r"<title>(.*?)</title>", page, re.S | re.I)
    return html.unescape(match.group(1)).strip() if match else "an HTML page"


def _stream(response: Any, dest: Path, progress: bool) -> None:
    total = response.headers.get("Content-Length")
    total = int(total) if total and str(total).isdigit() else None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    try:
        from tqdm.auto import tqdm

        written, head = 0, b""
        with open(tmp, "wb") as f, tqdm(
            total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress, leave=False
        ) as bar:
            while True:
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                f.write(chunk)
                if len(head) < 512:
                    head += chunk[: 512 - len(head)]
                written += len(chunk)
                bar.update(len(chunk))
        if total is not None and written != total:
            raise DownloadError(f"download of {dest.name} stopped after {written} of {total} bytes")
        if written == 0:
            raise DownloadError(f"download of {dest.name} returned an empty file")
        if looks_like_html(head):
            raise DownloadError(f"Google Drive sent an HTML page instead of {dest.name}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def download_gdrive(file_id: str, dest: str | Path, *, timeout: float = 60.0, progress: bool = True) -> Path:
    """Download the public Google Drive file ``file_id`` to ``dest``.

    Raises :class:`DownloadError` when Google Drive answers with a page instead of the file, and lets
    network errors (:data:`NETWORK_ERRORS`) and errors writing ``dest`` (``OSError``) through.
    """
    dest = Path(dest)
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    url = gdrive_url(file_id)
    for _ in range(3):
        response = _open_url(opener, url, timeout)
        try:
            if "text/html" not in response.headers.get("Content-Type", "").lower():
                _stream(response, dest, progress)
                return dest
            page = response.read(4 << 20).decode("utf-8", "replace")
        finally:
            response.close()
        next_url = _confirm_url(page, jar, file_id)
        if next_url is None or next_url == url:
            raise DownloadError(
                f"Google Drive answered with {_page_title(page)!r} instead of the file {file_id} "
                "(download quota exceeded, or the file is no longer shared)"
            )
        url = next_url
    raise DownloadError(f"Google Drive kept answering with confirmation pages for the file {file_id}")
