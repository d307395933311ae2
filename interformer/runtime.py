"""What the OpenVINO engines share: the CPU's bf16 support, the runtime's availability and compile settings, and
the on-disk cache of converted models (interformer.click_engine for clicks, interformer.encode_engine for
the image encoder)."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .file_locks import flock_within

CACHE_ENV = "INTERFORMER_ENGINE_CACHE"


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(flags: set[str] | None = None) -> bool:
    """True when the CPU computes bf16 natively (AMX-BF16 or AVX512-BF16)."""
    flags = cpu_flags() if flags is None else flags
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def openvino_available() -> str | None:
    """None when OpenVINO can be imported, else the reason it cannot."""
    try:
        import openvino  # noqa: F401
    except Exception as e:  # an ImportError, or a broken native library
        return f"OpenVINO is not importable ({type(e).__name__}: {e})"
    return None


def runtime_tag() -> str:
    """The installed OpenVINO's release as a path-safe tag (`ov2026_4_1`): part of every converted model's cache
    key, so that a model converted (and its graph chosen) by one release is never read by another; after an
    upgrade each size converts once more."""
    import openvino

    release = re.match(r"[0-9.]+", openvino.__version__)
    return "ov" + re.sub(r"[^0-9A-Za-z]+", "_", release.group(0) if release else openvino.__version__).strip("_")


def engine_cache_root(cache_dir: str | None = None) -> Path:
    """The folder of converted models: `cache_dir`, else $INTERFORMER_ENGINE_CACHE, else
    ~/.cache/interformer/click-engine (the name it had when only clicks were converted)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "interformer" / "click-engine"


def compile_settings(precision: str, threads: int) -> dict[str, str]:
    """OpenVINO CPU settings of both engines: one latency-bound stream on `threads` unpinned threads."""
    if precision not in ("f32", "bf16"):
        raise ValueError(f"precision must be f32 or bf16, got {precision!r}")
    return {
        "INFERENCE_PRECISION_HINT": precision,
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
        "INFERENCE_NUM_THREADS": str(max(1, int(threads))),
        # OpenVINO pins its threads to cores counted from the first, per process: two single-thread serving
        # actors or job workers would share core 0 and each run take twice as long (bench: 225 vs 117 ms per
        # click); the OS scheduler spreads unpinned threads over the free cores.
        "ENABLE_CPU_PINNING": "NO",
    }


class DamagedIRError(RuntimeError):
    """A cached converted model whose files are missing, incomplete or not what was saved."""


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def ir_digest(path: Path) -> str:
    """The sha256 of an IR's graph (.xml) and weights (.bin), as saved beside them."""
    return f"{_file_sha256(path)} {_file_sha256(path.with_suffix('.bin'))}"


def digest_path(path: Path) -> Path:
    return path.with_suffix(".sha256")


class CacheWriteError(OSError):
    """A converted model that could not be saved in the cache; names the entry and, when known, the disk's reason
    (a full disk, a file-size limit)."""


TMP_PREFIX = ".tmp-"  # .tmp-<host>-<pid>-<random>: one conversion's private folder beside the entry it saves
LOCK_WAIT_S = 120.0  # how long a conversion waits for another process's lock before converting without it
_LEGACY_TMP = re.compile(r"\.tmp(\d+)\.(xml|bin|sha256)$")  # per-pid temp files of earlier versions


def _ir_bytes(ov_model) -> int:
    """The weights' size of a converted model (its Constants), about the size of its .bin."""
    return sum(op.get_byte_size() for op in ov_model.get_ordered_ops() if op.get_type_name() == "Constant")


def _disk_cause(folder: Path, need: int) -> OSError | None:
    """The OSError (ENOSPC, EFBIG, EDQUOT) that writing `need` bytes in `folder` meets now, else None: the runtime's
    own save error says only "iostream error"."""
    try:
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX + "probe-", dir=folder)
    except OSError as e:
        return e
    try:
        os.posix_fallocate(fd, 0, max(1, need))
    except OSError as e:
        return e if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else None
    finally:
        os.close(fd)
        os.unlink(probe)
    return None


def _save_error(path: Path, e: Exception, need: int) -> CacheWriteError:
    cause = e if isinstance(e, OSError) and e.errno is not None else _disk_cause(path.parent, need)
    if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        why = f"the disk is full ({errno.errorcode[cause.errno]}: {cause.strerror})"
    elif cause is not None and cause.errno == errno.EFBIG:
        why = f"the file is larger than this process may write (EFBIG: {cause.strerror})"
    else:
        why = f"{type(e).__name__}: {e}"
    err = CacheWriteError(f"cannot save {path} ({need / 2**20:.1f} MiB): {why}")
    if cause is not None:
        err.errno = cause.errno
    return err


def save_ir(ov_model, path: Path) -> None:
    """Save a converted model as IR (f32 weights, never compressed) with the digest of its two files, so that no
    reader sees a half-written one and a damaged one is noticed: written in a private folder made beside it
    (mkdtemp: a name nobody can guess or plant a link at), then the .bin, the digest and last the .xml that names
    them moved in place. On any failure the private folder is removed and a CacheWriteError names the entry and,
    for a full disk or a file-size limit, says so."""
    import openvino as ov

    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-", dir=path.parent))
    try:
        tmp = work / path.name
        try:
            ov.save_model(ov_model, str(tmp), compress_to_fp16=False)
            digest_path(tmp).write_text(ir_digest(tmp) + "\n")
        except Exception as e:
            raise _save_error(path, e, _ir_bytes(ov_model)) from e
        os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(digest_path(tmp), digest_path(path))
        os.replace(tmp, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(folder: Path, log: logging.Logger) -> None:
    """Remove what conversions of processes no longer alive on this host left in `folder` (killed, or from
    earlier versions that kept their temp files after a failure): they hold up to a whole model's size each."""
    host = socket.gethostname()
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        pid = None
        if name.startswith(TMP_PREFIX):
            owner = name[len(TMP_PREFIX):].rsplit("-", 2)
            if len(owner) == 3 and owner[0] == host and owner[1].isdigit():
                pid = int(owner[1])
        elif (m := _LEGACY_TMP.search(name)) is not None:
            pid = int(m.group(1))
        if pid is None or _pid_alive(pid):
            continue
        target = folder / name
        try:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
            log.info("removed %s, left by a conversion of process %d that is no longer running", target, pid)
        except OSError:
            pass


def read_ir(core, path: Path, check: Callable[[object], str | None] | None = None):
    """The IR at `path`, read by `core` only after its files match the digest saved with them (a flipped byte
    in 400 MB of weights reads fine and answers wrongly) and `check(model)` finds nothing wrong (a reason
    string); DamagedIRError otherwise. ~0.25 s per 400 MB."""
    try:
        saved = digest_path(path).read_text().strip()
        found = ir_digest(path)
    except OSError as e:
        raise DamagedIRError(f"{type(e).__name__}: {e}") from None
    if saved != found:
        raise DamagedIRError("its files differ from the digest saved with them")
    model = core.read_model(str(path))
    why = None if check is None else check(model)
    if why is not None:
        raise DamagedIRError(why)
    return model


def _open_lock(path: Path) -> int | None:
    """A descriptor of the lock file `path`, never following a link planted there and never truncating it
    (created with the cache folder's read/write bits); None where it cannot be opened (a read-only cache)."""
    flags = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        mode = os.stat(path.parent).st_mode & 0o666
    except OSError:
        mode = 0o600
    for access in (os.O_RDWR, os.O_RDONLY):
        try:
            return os.open(path, flags | access, mode)
        except OSError:
            continue
    return None


@contextlib.contextmanager
def _conversion_lock(path: Path, log: logging.Logger, wait_s: float | None = None) -> Iterator[None]:
    """An exclusive lock on `<path>.lock`, waited for at most `wait_s` (default LOCK_WAIT_S): a holder that
    stalls (stopped, hung on a network disk) then costs a warning and a conversion without it, which is safe
    because a saved entry appears by atomic renames. No lock where the cache cannot be written (a read-only
    cache shared by machines: reading needs none, and a missing entry then fails to save with the OS's
    reason) or cannot lock (ENOLCK on some network mounts)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    lock_path = path.with_suffix(".lock")
    fd = _open_lock(lock_path)
    if fd is None:
        yield
        return
    try:
        wait = LOCK_WAIT_S if wait_s is None else wait_s
        try:
            if not flock_within(fd, wait):
                log.warning("%s is still held by another process after %.0f s; converting without it",
                            lock_path, wait)
        except OSError:  # a filesystem without locks: convert without one
            pass
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_or_convert(core, path: Path, convert: Callable[[], object], log: logging.Logger,
                    check: Callable[[object], str | None] | None = None, lock_wait_s: float | None = None):
    """The cached IR at `path`, converted (`convert()` -> an OpenVINO model) and saved first where it is missing,
    damaged or fails `check` (with a warning). A file lock beside it makes processes that start together convert
    once (waited for at most `lock_wait_s`); before converting, what dead processes' conversions left in the
    folder is removed. The saved IR is what is read back either way, so every process compiles the same files."""
    with _conversion_lock(path, log, lock_wait_s):
        if path.is_file():
            try:
                return read_ir(core, path, check)
            except Exception as e:  # damaged or foreign files (a truncated .bin, an edited .xml, no digest)
                log.warning("the cached %s cannot be read (%s: %s); converting again", path, type(e).__name__, e)
        remove_stale_temps(path.parent, log)
        save_ir(convert(), path)
        return read_ir(core, path, check)


def weights_key(config: object, *modules) -> str:
    """sha256 (16 hex) of a config's repr and the modules' weights (names and bytes, in order): the key of a
    model converted from them, so that other weights never read its IR."""
    h = hashlib.sha256(repr(config).encode())
    for module in modules:
        for name, t in module.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
