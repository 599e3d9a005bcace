"""Download an official archive, check its md5 and unpack it, or fail with a message that says
how to place the files by hand. Used by every dataset that can fetch itself.

``fetch`` is the only function that touches the network; tests monkeypatch it to raise
``urllib.error.URLError`` so no connection is ever attempted. ``HARNESS_OFFLINE=1`` skips the
attempt as well (useful on clusters whose compute nodes hang on DNS instead of failing).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from harness.errors import DataMissingError

TIMEOUT_S = 60


def md5sum(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, dest: Path) -> None:
    """Stream ``url`` to ``dest`` (via a ``.part`` file, so an interrupted download is never mistaken
    for a complete one)."""
    part = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r, open(part, "wb") as f:
        shutil.copyfileobj(r, f, length=1 << 20)
    os.replace(part, dest)


def extract(archive: Path, dest: Path) -> None:
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest)
    else:
        with tarfile.open(archive) as t:
            # the "data" filter refuses absolute paths, links out of dest and device files
            t.extractall(dest, filter="data") if hasattr(tarfile, "data_filter") else t.extractall(dest)


def download_and_extract(
    urls: str | list[str], dest: Path, md5: str | None, *, what: str, expected: str, manual: str = ""
) -> None:
    """Fetch the first of ``urls`` that works into ``dest``, verify ``md5`` (when known) and unpack it
    there; the archive is deleted afterwards. Raises ``DataMissingError`` naming ``expected`` (the
    paths the loader looks for) and the URL to fetch by hand when every attempt fails."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    dest.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        archive = dest / url.rsplit("/", 1)[-1]
        try:
            if os.environ.get("HARNESS_OFFLINE", "") not in ("", "0"):
                raise urllib.error.URLError("HARNESS_OFFLINE is set")
            if not archive.exists():
                print(f"[harness] downloading {what} from {url} to {archive}", file=sys.stderr, flush=True)
                fetch(url, archive)
            if md5 is not None and (got := md5sum(archive)) != md5:
                archive.unlink()
                raise OSError(f"md5 mismatch for {archive.name}: got {got}, expected {md5}")
            extract(archive, dest)
            archive.unlink()
            return
        except (urllib.error.URLError, OSError, zipfile.BadZipFile, tarfile.TarError) as e:
            errors.append(f"{url}: {e}")
    raise DataMissingError(
        f"{what} not found: expected {expected}. Downloading it failed ({'; '.join(errors)}). "
        f"On a machine without internet, fetch {urls[0]}"
        + (f" (md5 {md5})" if md5 else "")
        + f" elsewhere and unpack it into {dest}"
        + (f"; {manual}" if manual else "")
        + ". See datasets/README.md."
    )
