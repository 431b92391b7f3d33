"""Feature extractor weights in ganforge's cache: ``ganforge weights get inception``.

Training and evaluation never download anything; this command is the one explicit step that does, on a
machine with internet access. It fetches torch-fidelity's Inception weights from their official URL
(torch-fidelity's own ``URL_INCEPTION_V3``) into ``$GANFORGE_CACHE/weights/`` (default
``~/.cache/ganforge/weights/``), where ``eval.weights_path`` looks when it is not set. The download shows a
progress bar, goes to ``FILE.part`` first and resumes from there (an HTTP Range request) when it was cut
short, and the file gets its final name only once its sha256 is the expected one: a file with another
digest is deleted.

The expected sha256 of ``weights-inception-2015-12-05-6726825d.pth``: torch-fidelity publishes none (it
loads the file with ``check_hash=False``); the file name carries its first eight hex digits (torch hub's
convention), and the full digest is the one recorded for this file in public projects that pin it.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

# torch-fidelity 0.4's URL_INCEPTION_V3 (a test checks they agree)
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[-1]
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
CACHE_ENV = "GANFORGE_CACHE"
KNOWN = {"inception": (INCEPTION_URL, INCEPTION_SHA256)}  # name: official URL, sha256


class WeightsError(RuntimeError):
    """A weights file could not be fetched or verified; the message says what to do."""


def cache_dir() -> Path:
    """Where downloaded weights go: ``$GANFORGE_CACHE/weights``, else ``~/.cache/ganforge/weights``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "ganforge") / "weights"


def cached_inception() -> Path:
    """The path ``ganforge weights get inception`` writes (whether or not it exists)."""
    return cache_dir() / INCEPTION_FILE


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@dataclass
class Download:
    """What :func:`download` did: the verified file, the bytes fetched now, and from which offset."""

    path: Path
    sha256: str
    fetched: int
    resumed_from: int
    already_there: bool = False


def download(
    url: str, dest: str | Path, sha256: str, *, progress: bool = True, timeout: float = 60.0, howto: str = ""
) -> Download:
    """Fetch ``url`` to ``dest``, resuming ``dest.part`` if an earlier attempt left one; keep it only if its
    sha256 is ``sha256``.

    Raises :class:`WeightsError` when the server cannot be reached (the message gives the URL and ``dest``,
    and ``howto``, to fetch it elsewhere), when the transfer breaks off (``dest.part`` is kept: run again
    to resume), and when the digest is wrong (``dest.part`` is deleted; ``dest`` is not written).
    """
    from tqdm import tqdm

    dest = Path(dest)
    sha256 = sha256.lower()
    if dest.is_file() and sha256_of(dest) == sha256:
        return Download(dest, sha256, 0, 0, already_there=True)
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeightsError(f"cannot create {dest.parent}: {e.strerror}") from None
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "ganforge", **({"Range": f"bytes={have}-"} if have else {})}
    fetched = 0
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if not (e.code == 416 and have):  # 416: nothing after byte `have`, the partial file may be whole
            raise WeightsError(f"{url}: HTTP {e.code} {e.reason}. {_elsewhere(url, dest, howto)}") from None
        response = None
    except (urllib.error.URLError, HTTPException, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise WeightsError(f"cannot download {url}: {reason}. {_elsewhere(url, dest, howto)}") from None
    if response is not None:
        with response:
            start = _range_start(response) if response.status == 206 else 0
            if start not in (0, have):
                raise WeightsError(
                    f"{url}: the server sent bytes from {start}, not {have}; delete {part} and run again"
                )
            have = start
            length = response.headers.get("Content-Length")
            total = have + int(length) if length and length.isdigit() else None
            try:
                with (
                    open(part, "ab" if have else "wb") as f,
                    tqdm(
                        total=total,
                        initial=have,
                        unit="B",
                        unit_scale=True,
                        unit_divisor=1024,
                        desc=dest.name,
                        disable=not progress,
                        leave=True,
                    ) as bar,
                ):
                    while block := response.read(1 << 16):
                        f.write(block)
                        fetched += len(block)
                        bar.update(len(block))
            except (HTTPException, OSError) as e:
                raise WeightsError(
                    f"the download of {url} broke off after {have + fetched:,} bytes ({e}); "
                    f"{part} is kept: run the same command again to resume"
                ) from None
            if total is not None and have + fetched < total:
                raise WeightsError(
                    f"the download of {url} ended after {have + fetched:,} of {total:,} bytes; "
                    f"{part} is kept: run the same command again to resume"
                )
    digest = sha256_of(part)
    if digest != sha256:
        part.unlink()
        raise WeightsError(
            f"{url}: the downloaded file's sha256 is {digest}, not {sha256}; it was deleted (a "
            f"corrupted or tampered download). Run again; if this repeats, fetch it elsewhere and "
            f"check: sha256sum {dest.name}"
        )
    os.replace(part, dest)
    return Download(dest, digest, fetched, have)


def _range_start(response) -> int:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else -1


def _elsewhere(url: str, dest: Path, howto: str) -> str:
    return (
        f"The file goes to {dest}: on a machine with internet access, {howto or 'fetch it'} (or curl -L -o "
        f"{dest.name} {url}) and copy it there"
    )


def get(name: str, url: str | None = None, sha256: str | None = None, progress: bool = True) -> Download:
    """Download the weights called ``name`` (``inception``) into :func:`cache_dir`; ``url`` and ``sha256``
    override the official ones (tests serve a small file from a local server)."""
    if name not in KNOWN:
        raise WeightsError(f"unknown weights {name!r}; known: {', '.join(KNOWN)}")
    official_url, official_sha = KNOWN[name]
    dest = cache_dir() / official_url.rsplit("/", 1)[-1]
    return download(
        url or official_url, dest, sha256 or official_sha, progress=progress, howto=f"run `ganforge weights get {name}`"
    )
