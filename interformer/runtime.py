"""What the OpenVINO engines share: the CPU's bf16 support, the runtime's availability and compile settings, and
the on-disk cache of converted models (interformer.click_engine for clicks, interformer.encode_engine for
the image encoder)."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, Iterator

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


def save_ir(ov_model, path: Path) -> None:
    """Save a converted model as IR (f32 weights, never compressed) with the digest of its two files, so that no
    reader sees a half-written one and a damaged one is noticed: written under a per-process name, then the .bin,
    the digest and last the .xml that names them moved in place."""
    import openvino as ov

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.xml")
    ov.save_model(ov_model, str(tmp), compress_to_fp16=False)
    tmp_digest = digest_path(tmp)
    tmp_digest.write_text(ir_digest(tmp) + "\n")
    os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
    os.replace(tmp_digest, digest_path(path))
    os.replace(tmp, path)


def read_ir(core, path: Path):
    """The IR at `path`, read by `core` only after its files match the digest saved with them (a flipped byte
    in 400 MB of weights reads fine and answers wrongly); DamagedIRError otherwise. ~0.25 s per 400 MB."""
    try:
        saved = digest_path(path).read_text().strip()
        found = ir_digest(path)
    except OSError as e:
        raise DamagedIRError(f"{type(e).__name__}: {e}") from None
    if saved != found:
        raise DamagedIRError("its files differ from the digest saved with them")
    return core.read_model(str(path))


@contextlib.contextmanager
def _conversion_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `<path>.lock`; none where the cache cannot be written (a read-only cache shared
    by machines: reading needs no lock, and a missing entry then fails to save with the OS's reason)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "w")
    except OSError:
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_or_convert(core, path: Path, convert: Callable[[], object], log: logging.Logger):
    """The cached IR at `path`, converted (`convert()` -> an OpenVINO model) and saved first where it is missing
    or damaged (with a warning). A file lock beside it makes processes that start together convert once; the
    saved IR is what is read back either way, so every process compiles the same files."""
    with _conversion_lock(path):
        if path.is_file():
            try:
                return read_ir(core, path)
            except Exception as e:  # damaged or foreign files (a truncated .bin, an edited .xml, no digest)
                log.warning("the cached %s cannot be read (%s: %s); converting again", path, type(e).__name__, e)
        save_ir(convert(), path)
        return read_ir(core, path)


def weights_key(config: object, *modules) -> str:
    """sha256 (16 hex) of a config's repr and the modules' weights (names and bytes, in order): the key of a
    model converted from them, so that other weights never read its IR."""
    h = hashlib.sha256(repr(config).encode())
    for module in modules:
        for name, t in module.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
