"""Which images to encode: list a folder, a glob, a text file of paths/URIs, or a COCO annotation file.

Every input becomes an `ImageSource(image_id, uri)`. Ids are stable across runs (they key the
feature table): the path relative to the input root, with '/' separators, or the COCO `file_name`
(or numeric `id`). Local paths and object-store URIs (s3://, gs://, abfs://, file://) are listed and
read with pyarrow's filesystems, the same layer Ray Data's file readers use, so credentials come
from the usual environment (AWS_* variables, instance profiles, ...).
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import stat
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Callable

from pyarrow import fs as pafs

from .images import FORMAT_EXTENSIONS, TOO_LARGE, UNREADABLE, ImageDecodeError

IMAGE_EXTENSIONS = tuple(ext for exts in FORMAT_EXTENSIONS.values() for ext in exts)
LIST_FILE_EXTENSIONS = (".txt", ".lst")
_URI_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_GLOB_CHARS = set("*?[")


class SourceError(ValueError):
    """The input specification cannot be listed (missing folder, bad COCO file, ...)."""


@dataclass(frozen=True)
class ImageSource:
    """One image to encode: its id in the feature table and where its bytes are."""

    image_id: str
    uri: str


@dataclass
class Listing:
    """Result of listing an input: the images, files skipped for their extension, id clashes, inputs that
    cannot be encoded (`unusable`: image id, uri, reason, detail, names in a printable escaped form) and ids
    that name the same file (`same_uri`: the first id and another one; both are listed and encoded)."""

    sources: list[ImageSource]
    ignored: list[str] = field(default_factory=list)
    duplicates: list[tuple[ImageSource, ImageSource]] = field(default_factory=list)
    unusable: list[tuple[str, str, str, str]] = field(default_factory=list)
    same_uri: list[tuple[ImageSource, ImageSource]] = field(default_factory=list)


def is_uri(path: str) -> bool:
    """True for 'scheme://...' strings (object stores, file://), False for plain local paths."""
    return bool(_URI_RE.match(path))


def list_images(
    spec: str,
    *,
    image_root: str | None = None,
    coco_id: str = "file_name",
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
) -> Listing:
    """List the images named by `spec`: a folder (recursive), a glob, a .txt/.lst list file, a COCO .json,
    or a single image file. `image_root` is the COCO image folder (required for COCO) or, for list files,
    the root ids are made relative to. A spec with '*', '?' or '[' is a glob unless it names an existing file or
    folder ('set[1]/'). Sources come back sorted by id, de-duplicated by id."""
    spec = str(spec)
    if any(c in _GLOB_CHARS for c in spec) and not _exists(spec):
        listing = list_glob(spec, extensions)
    elif spec.lower().endswith(".json"):
        if image_root is None:
            raise SourceError(f"{spec} is a COCO annotation file: give the folder of its images (--image-root)")
        listing = list_coco(spec, image_root, coco_id)
    elif spec.lower().endswith(LIST_FILE_EXTENSIONS):
        listing = list_text_file(spec, image_root)
    else:
        info = _info(spec)
        if info.type == pafs.FileType.Directory:
            listing = list_folder(spec, extensions)
        elif info.type == pafs.FileType.File:
            listing = Listing([ImageSource(posixpath.basename(info.path), _join_uri(spec, ""))])
        else:
            raise SourceError(f"input {spec!r} does not exist")
    return _same_uri(_dedupe(_drop_unstorable(listing)))


def missing_local_input(spec: str, image_root: str | None = None) -> str | None:
    """Why a local input cannot be listed, found without listing anything (None: it may be listable): the input
    path, or the COCO file's --image-root, does not exist. A job checks this before it loads a model, so a
    mistyped path is one line at once. Globs and object-store URIs are left to `list_images`."""
    spec = str(spec)
    if not is_uri(spec) and not any(c in _GLOB_CHARS for c in spec) and not os.path.lexists(spec):
        return f"input {spec!r} does not exist"
    if (spec.lower().endswith(".json") and image_root is not None and not is_uri(image_root)
            and not os.path.isdir(image_root)):
        return f"--image-root {image_root!r} is not a folder"
    return None


def printable(text: str) -> str:
    """`text` with what is not valid UTF-8 escaped: the bytes of an undecodable file name as \\xNN (Python keeps
    them as lone surrogates), any other lone surrogate as \\udNNN."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _storable(text: str) -> bool:
    """True when `text` is valid Unicode (no lone surrogates), as Arrow and the feature table need."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _drop_unstorable(listing: Listing) -> Listing:
    """Move the sources whose id or uri is not valid Unicode (a file name that is not UTF-8, a COCO name with a
    lone surrogate) to `unusable`: no table can key them, and one of them must not stop the others."""
    keep, unusable = [], list(listing.unusable)
    for s in listing.sources:
        if _storable(s.image_id) and _storable(s.uri):
            keep.append(s)
        else:
            unusable.append((printable(s.image_id), printable(s.uri), UNREADABLE,
                             "the file name is not valid UTF-8 (shown escaped): rename the file to encode it"))
    return Listing(keep, listing.ignored, listing.duplicates, unusable, listing.same_uri)


def _same_uri(listing: Listing) -> Listing:
    """Report the ids that name one file ('b.png', './b.png', 'sub/../b.png' in a COCO file): each is stored
    under its own id, as its prompts look it up, so the file's features are stored once per id."""
    first: dict[str, ImageSource] = {}
    same = list(listing.same_uri)
    for s in listing.sources:
        if s.uri in first:
            same.append((first[s.uri], s))
        else:
            first[s.uri] = s
    return Listing(listing.sources, listing.ignored, listing.duplicates, listing.unusable, same)


@dataclass(frozen=True)
class _Entry:
    """One path found under a listed folder. `problem` says why it cannot be an input (a FIFO, socket or device;
    a folder that could not be listed, `unlisted`, whose images are then missing from the listing)."""

    rel: str
    is_dir: bool
    problem: str | None = None
    unlisted: bool = False


def list_folder(root: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> Listing:
    """Every path under `root` (recursively) named like an image: files, and also what cannot be read as
    one (a dangling link, a folder named 'x.jpg'), which the job then records as unreadable, exactly as
    for the same path in a list file. Other files are reported as ignored; hidden files and folders
    (starting with '.') are skipped. A FIFO, socket or device named like an image, and every folder that
    cannot be listed, are `unusable` (unreadable) inputs: never opened, never silently missing."""
    return _select(root, lambda rel: rel.lower().endswith(extensions), lambda rel: True)


def _select(root: str, wanted: Callable[[str], bool], may_hold: Callable[[str], bool]) -> Listing:
    """The listing of the entries under `root` whose relative path is `wanted`; `may_hold(rel)` says whether a
    folder that could not be listed may have held wanted paths (then it is reported, as when it is wanted)."""
    entries = _walk_local(root) if not is_uri(root) else _walk_store(root)
    sources, ignored, unusable = [], [], []
    for e in entries:
        if any(part.startswith(".") for part in e.rel.split("/")):
            continue
        uri = _join_uri(root, e.rel)
        if e.unlisted:
            if may_hold(e.rel) or wanted(e.rel):
                unusable.append((e.rel, uri, UNREADABLE, e.problem))
        elif wanted(e.rel):
            if e.problem:
                unusable.append((e.rel, uri, UNREADABLE, e.problem))
            else:
                sources.append(ImageSource(e.rel, uri))
        elif not e.is_dir:
            ignored.append(e.rel)
    return Listing(sorted(sources, key=lambda s: s.image_id), sorted(ignored), unusable=sorted(unusable))


def _walk_local(root: str) -> list[_Entry]:
    """Every entry under a local folder, dangling links included (pyarrow's listing drops them). Links to
    folders are listed, not followed; hidden folders are not entered. A special file (FIFO, socket, device)
    carries its problem, found from the directory entry's type without opening it; a folder that cannot be
    listed is one `unlisted` entry. Only the root itself failing is a SourceError."""
    base = os.path.abspath(root)
    if not os.path.isdir(base):
        raise SourceError(f"cannot list folder {root!r}: not a folder")
    entries: list[_Entry] = []
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        path = os.path.join(base, rel_dir) if rel_dir else base
        prefix = rel_dir + "/" if rel_dir else ""
        try:
            with os.scandir(path) as it:
                children = list(it)
        except OSError as e:
            if not rel_dir:
                raise SourceError(f"cannot list folder {root!r}: {e}") from None
            entries.append(_Entry(rel_dir, True, f"cannot list folder {path}: {e} (the images in it are not "
                                                 "listed)", unlisted=True))
            continue
        if rel_dir:
            entries.append(_Entry(rel_dir, True))
        for child in children:
            rel = prefix + child.name
            if _entry_is_dir(child):
                if child.is_symlink():
                    entries.append(_Entry(rel, True))
                elif not child.name.startswith("."):
                    pending.append(rel)
            else:
                entries.append(_Entry(rel, False, _special_problem(child)))
    return entries


def _entry_is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _special_problem(entry: os.DirEntry) -> str | None:
    """Why a directory entry that is no folder cannot be read as an image: it (or what its link leads to) is
    a FIFO, socket or device. None for a regular file, and for a dangling or looping link, which the read
    then reports like the same path from a list file."""
    try:
        if entry.is_file():
            return None
        mode = entry.stat().st_mode
    except OSError:
        return None
    return _not_regular(entry.path, mode)


def _not_regular(path: str, mode: int) -> str | None:
    """The sentence for a path that is not a regular file (None when it is one)."""
    if stat.S_ISREG(mode):
        return None
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a folder" if stat.S_ISDIR(mode) else "not a file")
    return f"cannot read {path}: it is {kind}, not a regular file"


def _walk_store(root: str) -> list[_Entry]:
    """Every object and prefix under an object-store URI."""
    filesystem, base = _filesystem(root)
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    except (FileNotFoundError, OSError) as e:
        raise SourceError(f"cannot list folder {root!r}: {e}") from None
    base_clean = base.rstrip("/")
    return [_Entry(_relative(i.path, base_clean), i.type == pafs.FileType.Directory) for i in infos]


def list_glob(pattern: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> Listing:
    """Files matching a glob ('*' and '?' stay within one path segment, '**' spans any number of them).
    Ids are relative to the longest folder prefix without wildcards. A pattern whose last segment names
    an extension ('*.png') keeps every match; otherwise only image extensions are kept."""
    root, rest = _split_glob(pattern)
    parts = rest.split("/")
    keep_any_ext = "." in parts[-1]
    listing = _select(
        root,
        lambda rel: _glob_match(parts, rel.split("/")) and (keep_any_ext or rel.lower().endswith(extensions)),
        lambda rel: _glob_may_hold(parts, rel.split("/")),
    )
    return Listing(listing.sources, unusable=listing.unusable)


def list_text_file(path: str, image_root: str | None = None) -> Listing:
    """One path or URI per line ('#' comments and blank lines skipped). Relative entries are resolved
    against the list file's folder; ids are entries relative to `image_root` (default: that folder),
    or the entry as written when it lies elsewhere. Lines end at a newline only (a carriage return before it is
    dropped) and nothing else is stripped from an entry, so a list names exactly the files a folder listing
    finds (' a.png', or a name with U+0085 or U+2028 in it)."""
    try:
        text = read_bytes(path).decode("utf-8-sig")
    except ImageDecodeError as e:
        raise SourceError(f"cannot read list file {path!r}: {e.detail}") from None
    except UnicodeDecodeError as e:
        raise SourceError(f"list file {path!r} is not UTF-8 text: {e}") from None
    list_dir = _parent(path)
    id_root = image_root if image_root is not None else list_dir
    sources = []
    for entry in _list_entries(text):
        if is_uri(entry) or os.path.isabs(entry):
            uri = entry
        else:
            uri = _join_uri(list_dir, entry)
        sources.append(ImageSource(_id_under(uri, id_root, fallback=entry), uri))
    return Listing(sources)


def _list_entries(text: str) -> list[str]:
    """The entries of a list file: its lines split at newlines only, one trailing carriage return dropped, blank
    lines and '#' comments (both judged with surrounding white space stripped) left out; entries are kept as
    written."""
    entries = []
    for line in text.split("\n"):
        entry = line[:-1] if line.endswith("\r") else line
        stripped = entry.strip()
        if stripped and not stripped.startswith("#"):
            entries.append(entry)
    return entries


def list_coco(annotation_file: str, image_root: str, coco_id: str = "file_name") -> Listing:
    """The `images` of a COCO annotation file, read from `image_root/<file_name>`. Ids are the
    `file_name` (default) or the numeric `id` as a string (`coco_id="id"`)."""
    if coco_id not in ("file_name", "id"):
        raise SourceError(f"coco_id must be 'file_name' or 'id', got {coco_id!r}")
    try:
        doc = json.loads(read_bytes(annotation_file))
    except ImageDecodeError as e:
        raise SourceError(f"cannot read COCO file {annotation_file!r}: {e.detail}") from None
    except json.JSONDecodeError as e:
        raise SourceError(f"{annotation_file!r} is not valid JSON: {e}") from None
    except RecursionError:
        raise SourceError(f"{annotation_file!r} nests its JSON too deeply to be a COCO annotation file") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise SourceError(f"{annotation_file!r} has no 'images' list: is it a COCO annotation file?")
    sources = []
    for i, entry in enumerate(images):
        if not isinstance(entry, dict) or "file_name" not in entry or "id" not in entry:
            raise SourceError(f"{annotation_file!r}: images[{i}] lacks 'file_name' or 'id'")
        name = str(entry["file_name"])
        image_id = name if coco_id == "file_name" else str(entry["id"])
        sources.append(ImageSource(image_id, _join_uri(image_root, name)))
    return Listing(sources)


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The whole content of a local file or object. ImageDecodeError(UNREADABLE) when it cannot be read, or is
    not a regular file (a FIFO, socket or device is refused from its stat, never opened in a way that blocks);
    ImageDecodeError(TOO_LARGE) when it has more than `max_bytes` bytes (at most `max_bytes` + 1 are read) or
    reading it runs out of memory."""
    try:
        filesystem, path = _filesystem(uri) if is_uri(uri) else (None, uri)
        if filesystem is None or isinstance(filesystem, pafs.LocalFileSystem):
            data = _read_local(path, uri, max_bytes)
        else:
            with filesystem.open_input_stream(path) as stream:
                data = _read_at_most(stream.read, max_bytes, _CHUNK)
    except ImageDecodeError:
        raise
    except MemoryError:
        raise ImageDecodeError(TOO_LARGE, f"reading {uri} ran out of memory") from None
    except (OSError, ValueError) as e:
        raise ImageDecodeError(UNREADABLE, f"cannot read {uri}: {e}") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise _over(uri, max_bytes)
    return data


def sha256_of(uri: str) -> str:
    """The sha256 of a local file's or object's content, read in chunks (memory bounded whatever its size);
    ImageDecodeError(UNREADABLE) as `read_bytes` gives it (a special file is refused from its stat)."""
    digest = hashlib.sha256()
    try:
        filesystem, path = _filesystem(uri) if is_uri(uri) else (None, uri)
        if filesystem is None or isinstance(filesystem, pafs.LocalFileSystem):
            _check_regular(uri, os.stat(path), None)
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            with os.fdopen(fd, "rb", buffering=0) as f:
                _check_regular(uri, os.fstat(fd), None)
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
        else:
            with filesystem.open_input_stream(path) as stream:
                while chunk := stream.read(_CHUNK):
                    digest.update(chunk)
    except ImageDecodeError:
        raise
    except (OSError, ValueError) as e:
        raise ImageDecodeError(UNREADABLE, f"cannot read {uri}: {e}") from None
    return digest.hexdigest()


def _read_local(path: str, uri: str, max_bytes: int | None) -> bytes:
    """A local regular file's bytes: stat first (a special file is refused unopened), then open non-blocking and
    check the opened file again (it may have been swapped meanwhile), reading at most `max_bytes` + 1 bytes."""
    _check_regular(uri, os.stat(path), max_bytes)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        _check_regular(uri, st, max_bytes)
        return _read_at_most(f.read, max_bytes, st.st_size)


_CHUNK = 8 * 1024 * 1024


def _read_at_most(read: Callable[[int], bytes], limit: int | None, expect: int) -> bytes:
    """Everything `read(n)` gives until its end, or the first `limit` + 1 bytes when there are more (the caller
    refuses those). The first read asks for `expect` + 1 bytes (a regular file's size: one read, one buffer),
    later ones for at most `_CHUNK`: no buffer is sized from the limit alone."""
    chunks: list[bytes] = []
    total, size = 0, expect + 1
    while limit is None or total <= limit:
        chunk = read(size if limit is None else min(size, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        size = _CHUNK
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _check_regular(uri: str, st: os.stat_result, max_bytes: int | None) -> None:
    problem = _not_regular(uri, st.st_mode)
    if problem:
        raise ImageDecodeError(UNREADABLE, problem)
    if max_bytes is not None and st.st_size > max_bytes:
        raise _over(uri, max_bytes, st.st_size)


def _over(uri: str, max_bytes: int, size: int | None = None) -> ImageDecodeError:
    """TOO_LARGE for a file with more bytes than an image under the pixel limit can need."""
    has = f"{size} bytes" if size is not None else f"over {max_bytes} bytes"
    return ImageDecodeError(TOO_LARGE, f"{uri} is {has}, more than an image under the pixel limit can need "
                                       f"({max_bytes} bytes, from --max-pixels)")


def _dedupe(listing: Listing) -> Listing:
    """Keep the first source of each id (sorted by id); pairs with the same id and another uri are reported."""
    seen: dict[str, ImageSource] = {}
    duplicates = list(listing.duplicates)
    for s in listing.sources:
        first = seen.get(s.image_id)
        if first is None:
            seen[s.image_id] = s
        elif first.uri != s.uri:
            duplicates.append((first, s))
    return Listing(sorted(seen.values(), key=lambda s: s.image_id), listing.ignored, duplicates, listing.unusable,
                   listing.same_uri)


@lru_cache(maxsize=16)
def _filesystem_for(scheme_and_host: str) -> pafs.FileSystem:
    filesystem, _ = pafs.FileSystem.from_uri(scheme_and_host)
    return filesystem


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    try:
        filesystem, inner = pafs.FileSystem.from_uri(path)
    except (ValueError, OSError) as e:
        raise SourceError(f"unsupported or malformed URI {path!r}: {e}") from None
    return filesystem, inner


def _exists(spec: str) -> bool:
    """True when `spec` names an existing file or folder (or a dangling link) as written."""
    if not is_uri(spec):
        return os.path.lexists(spec)
    try:
        return _info(spec).type != pafs.FileType.NotFound
    except SourceError:
        return False


def _info(path: str) -> pafs.FileInfo:
    filesystem, inner = _filesystem(path)
    try:
        return filesystem.get_file_info(inner)
    except OSError as e:
        raise SourceError(f"cannot access {path!r}: {e}") from None


def _relative(path: str, base: str) -> str:
    path = path.replace(os.sep, "/")
    base = base.replace(os.sep, "/")
    if base and path.startswith(base + "/"):
        return path[len(base) + 1 :]
    return path.lstrip("/")


def _join_uri(root: str, rel: str) -> str:
    """root + '/' + rel for URIs; an absolute local path otherwise."""
    if is_uri(root):
        return root.rstrip("/") + ("/" + rel if rel else "")
    return os.path.abspath(os.path.join(root, rel)) if rel else os.path.abspath(root)


def _parent(path: str) -> str:
    if is_uri(path):
        return path.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(path))


def _id_under(uri: str, root: str, fallback: str) -> str:
    if is_uri(uri) != is_uri(root):
        return fallback
    prefix = root.rstrip("/") if is_uri(root) else os.path.abspath(root).replace(os.sep, "/").rstrip("/")
    target = uri if is_uri(uri) else os.path.abspath(uri).replace(os.sep, "/")
    if target.startswith(prefix + "/"):
        return target[len(prefix) + 1 :]
    return fallback


def _split_glob(pattern: str) -> tuple[str, str]:
    """('root folder without wildcards', 'rest of the pattern')."""
    scheme = ""
    body = pattern
    match = _URI_RE.match(pattern)
    if match:
        scheme, body = pattern[: match.end()], pattern[match.end() :]
    parts = body.split("/")
    for i, part in enumerate(parts):
        if any(c in _GLOB_CHARS for c in part):
            root = "/".join(parts[:i])
            if not scheme and root == "" and body.startswith("/"):
                root = "/"
            return scheme + (root if root else ("" if scheme else ".")), "/".join(parts[i:])
    raise SourceError(f"{pattern!r} has no wildcard")


def _glob_may_hold(pattern: list[str], parts: list[str]) -> bool:
    """True when paths under the folder `parts` could match `pattern` (the folder matches a proper prefix)."""
    if not pattern:
        return False
    if pattern[0] == "**":
        return True
    if not parts:
        return True
    return fnmatchcase(parts[0], pattern[0]) and _glob_may_hold(pattern[1:], parts[1:])


def _glob_match(pattern: list[str], parts: list[str]) -> bool:
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_glob_match(rest, parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], head) and _glob_match(rest, parts[1:])
