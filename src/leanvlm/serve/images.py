"""Where a request's `image_url` may point: `data:` URLs always; local files only under a directory the operator
names; http(s) only when the operator allows it, with a fetch timeout. Every image is bounded in bytes. A URL that is
not allowed or does not resolve is a `ValueError` whose message tells the client what to send instead."""

from __future__ import annotations

import base64
import binascii
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import unquote, urlparse


@dataclass(frozen=True)
class ImageSources:
    max_bytes: int = 20 << 20
    local_dir: str | None = None  # files under this directory may be named by path or file:// URL
    remote: bool = False  # http(s) URLs are fetched
    fetch_timeout: float = 5.0


def image_bytes(url: str, sources: ImageSources) -> bytes:
    """The file bytes an `image_url` names (blocking: run it off the event loop for remote URLs)."""
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ValueError("A data: image URL must be base64: data:image/png;base64,...")
        if len(payload) > sources.max_bytes * 4 // 3 + 4:
            raise ValueError(f"The image is larger than the server's limit of {sources.max_bytes} bytes.")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ValueError(f"The data: image URL is not valid base64 ({error}).") from error
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        if not sources.remote:
            raise ValueError("This server does not fetch http(s) image URLs (start it with --allow-remote-images); "
                             "send the image inline as a data: URL.")
        return _fetch(url, sources)
    if scheme in ("file", ""):
        return _local_file(unquote(urlparse(url).path) if scheme == "file" else url, sources)
    raise ValueError(f"Unsupported image URL scheme {scheme!r}; send a data: URL.")


def _local_file(path: str, sources: ImageSources) -> bytes:
    if sources.local_dir is None:
        raise ValueError("This server does not read local image paths (start it with --allowed-local-media-path "
                         "DIR); send the image inline as a data: URL.")
    root = os.path.realpath(sources.local_dir)
    full = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, full]) != root:
        raise ValueError(f"Image paths must lie under the server's media directory {root}.")
    if not os.path.isfile(full):
        raise ValueError(f"No image file {path!r} under the server's media directory.")
    if os.path.getsize(full) > sources.max_bytes:
        raise ValueError(f"The image is larger than the server's limit of {sources.max_bytes} bytes.")
    with open(full, "rb") as f:
        return f.read()


def _fetch(url: str, sources: ImageSources) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=sources.fetch_timeout) as response:
            data = response.read(sources.max_bytes + 1)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        raise ValueError(f"The image at {url} could not be fetched ({error}).") from error
    if len(data) > sources.max_bytes:
        raise ValueError(f"The image is larger than the server's limit of {sources.max_bytes} bytes.")
    return data
