"""Where the backend may read an image from, and reading it.

Only two sources are allowed, so a task's data can never make the backend fetch from an arbitrary
host or read an arbitrary file:

- the configured Label Studio server (LABEL_STUDIO_URL, with LABEL_STUDIO_API_KEY), for Label Studio
  paths (`/data/upload/...`, `/data/local-files/?d=...`, `/storage-data/...`), absolute URLs on that
  same origin, and cloud URIs (`s3://`, `gs://`, `azure-blob://`) which Label Studio presigns; these
  go through label-studio-sdk's `get_local_path`;
- files under the allowed local roots (`file://` URLs or plain paths), resolved with symlinks and
  checked to stay inside a root.

Both settings come from the environment / the command line, never from a request.
"""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import cv2
import numpy as np

from interformer.preprocess import validate_image

LS_PATH_PREFIXES = ("/data/", "/storage-data/", "data/", "storage-data/", "/upload/", "upload/")
CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
MAX_IMAGE_BYTES = 256 * 1024 * 1024


class ImageAccessError(Exception):
    """The image of a task may not be, or could not be, read."""


@dataclass(frozen=True)
class ImageAccess:
    """Allowed image sources: one Label Studio server and a set of local folders."""

    label_studio_url: str | None = None
    api_key: str | None = field(default=None, repr=False)  # never in logs or reprs
    allowed_roots: tuple[str, ...] = ()
    cache_dir: str | None = None

    @classmethod
    def from_env(cls, allowed_roots: tuple[str, ...] = (), cache_dir: str | None = None) -> "ImageAccess":
        """Label Studio URL and key from LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY (as label-studio-sdk reads them)."""
        url = os.environ.get("LABEL_STUDIO_URL") or os.environ.get("LABEL_STUDIO_HOST") or None
        key = os.environ.get("LABEL_STUDIO_API_KEY") or os.environ.get("LABEL_STUDIO_ACCESS_TOKEN") or None
        return cls(url.rstrip("/") if url else None, key, tuple(str(Path(r).resolve()) for r in allowed_roots),
                   cache_dir)


def _origin(url: str) -> tuple[str, str, int]:
    p = urlparse(url)
    port = p.port or (443 if p.scheme == "https" else 80)
    return p.scheme.lower(), (p.hostname or "").lower(), port


def _has_dotdot(path: str) -> bool:
    return ".." in unquote(path).replace("\\", "/").split("/")


def classify(ref: str, access: ImageAccess) -> str:
    """'label_studio' (fetched through the configured server), 'local' (a file path) or raise."""
    if not isinstance(ref, str) or not ref.strip():
        raise ImageAccessError("task has no image reference")
    parsed = urlparse(ref)
    if parsed.scheme in ("http", "https"):
        if not access.label_studio_url or _origin(ref) != _origin(access.label_studio_url):
            raise ImageAccessError(
                f"image URL host {parsed.hostname!r} is not the configured Label Studio server; refused"
            )
        kind = "label_studio"
    elif parsed.scheme in CLOUD_SCHEMES:
        kind = "label_studio"
    elif parsed.scheme == "file" or (parsed.scheme == "" and not ref.startswith(LS_PATH_PREFIXES)):
        return "local"
    elif parsed.scheme == "" and ref.startswith(LS_PATH_PREFIXES):
        kind = "label_studio"
    else:
        raise ImageAccessError(f"image reference scheme {parsed.scheme!r} is not allowed")
    if _has_dotdot(parsed.path) or any(_has_dotdot(v) for vals in parse_qs(parsed.query).values() for v in vals):
        raise ImageAccessError(f"image reference {ref!r} contains '..'; refused")
    if not access.label_studio_url:
        raise ImageAccessError(f"LABEL_STUDIO_URL is not set, so {ref!r} cannot be fetched from Label Studio")
    return kind


def local_file(ref: str, access: ImageAccess) -> Path:
    """Resolve a file reference inside an allowed root (after symlinks), or raise."""
    path = unquote(urlparse(ref).path) if ref.startswith("file:") else ref
    if not access.allowed_roots:
        raise ImageAccessError(f"local image {ref!r} refused: no local roots are allowed (--allowed-root)")
    real = os.path.realpath(path)
    for root in access.allowed_roots:
        if os.path.commonpath([real, root]) == root:
            if not os.path.isfile(real):
                raise ImageAccessError(f"local image {ref!r} does not exist")
            return Path(real)
    raise ImageAccessError(f"local image {ref!r} is outside the allowed roots; refused")


def fetch_image_path(ref: str, access: ImageAccess, task_id: int | None = None) -> Path:
    """A local path holding the image `ref` points at, fetched from Label Studio when needed."""
    if classify(ref, access) == "local":
        return local_file(ref, access)
    from label_studio_sdk._extensions.label_studio_tools.core.utils.io import get_local_path

    if ref.startswith(("data/", "storage-data/")):
        ref = "/" + ref
    if access.cache_dir:
        os.makedirs(access.cache_dir, exist_ok=True)
    try:
        path = get_local_path(ref, cache_dir=access.cache_dir, hostname=access.label_studio_url,
                              access_token=access.api_key, task_id=task_id)
    except Exception as e:  # the SDK raises requests, OS and plain exceptions alike
        raise ImageAccessError(f"could not fetch {ref!r} from Label Studio: {type(e).__name__}: {e}") from None
    return Path(path)


def read_image(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file into RGB uint8 (H, W, 3); EXIF orientation is ignored, as Label Studio shows it."""
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise ImageAccessError(f"image file {path.name} is {size} bytes, over {MAX_IMAGE_BYTES}")
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise ImageAccessError(f"{posixpath.basename(str(path))} is not a decodable image")
    return validate_image(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), max_pixels)
