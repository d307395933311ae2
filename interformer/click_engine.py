"""Click engines: what runs the per-click network (I-MSA with cached keys/values + UPerHead).

  torch          PyTorch fp32, the reference path (bit-for-bit the model's `decode`).
  openvino-f32   the same network compiled by OpenVINO in f32 (passes the official parity fixtures).
  openvino-bf16  compiled in bf16 (AMX / AVX512-BF16); masks close to fp32, several times faster.
  fast           openvino-bf16 where the CPU has native bf16, openvino-f32 elsewhere.
The OpenVINO engines convert a graph written for the runtime: patch merging as convolutions (`ConvPatchMerging`).

`ClickEngineConfig` is the one way to choose: the API (`Predictor(model, engine=...)`), the backend CLI,
pre-annotation and evaluation all pass it down. Whatever the runtime cannot take (OpenVINO not installed, a
model whose zoom-in refine stages need per-click crop shapes, a CUDA predictor, no native bf16) falls back to
the next engine, and the reason is logged once per engine instance.

One compiled model per padded size: the pooled sizes of the attention are baked into the graph, so a
compiled model checks every input shape and dtype and refuses a different one (`EngineShapeError`, then torch
answers) instead of answering with a wrong mask. Inputs are cast to the compiled dtypes first
(`canonical_inputs`), and the dtypes are part of the key, so no caller's dtype can make a size unusable. At most
`max_sizes` compiled sizes are held (LRU). Converted models are saved as OpenVINO IR under the cache folder
(keyed by a hash of the weights and the input shapes and dtypes) with the sha256 of their files, so the next process reads and compiles a size
in about 0.2 s instead of converting it again (3-4 s), and a damaged file is converted again, never compiled.
OpenVINO's own compiled-blob cache (CACHE_DIR) is deliberately not used: with openvino 2026.4 a blob reloaded
for this graph crashed the process (a segfault in infer) where the same IR compiled afresh ran correctly.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cli_types import COUNT, absolute_folder
from .modeling import InterFormer
from .modeling.imsa import IMSACache, PatchMerging, Roi
from .runtime import (CACHE_ENV, compile_settings, engine_cache_root, native_bf16, openvino_available,
                      read_or_convert, runtime_tag, weights_key)

log = logging.getLogger("interformer.click_engine")

ENGINES = ("torch", "openvino-f32", "openvino-bf16", "fast")


COMPILE_MODES = ("blocking", "background")
# Compiled padded sizes an OpenVINO click engine holds at once (least recently used released): each costs tens of
# MiB for `small` at ~384x384 (measured 60-95 MiB) and more for larger models and sizes; recompiling an evicted
# size from its saved IR takes ~0.2-1 s.
DEFAULT_MAX_SIZES = 4


@dataclass(frozen=True)
class ClickEngineConfig:
    """engine: one of ENGINES; cache_dir: where converted models are kept (None: $INTERFORMER_ENGINE_CACHE,
    else ~/.cache/interformer/click-engine); compile: "blocking" (the first click at a new padded size waits
    for its conversion, so every click runs on the engine asked for) or "background" (the runtime converts
    in a thread and torch answers that size's clicks until it is ready: no click waits seconds; serving).
    A session keeps the engine that answered its first click (`ClickEngine.answering`): its clicks, undo and
    replay never mix torch states with compiled ones. max_sizes: compiled padded sizes held at once per engine
    (least recently used released, compiled again from the saved IR when next needed): the engine's memory."""

    engine: str = "torch"
    cache_dir: str | None = None
    compile: str = "blocking"
    max_sizes: int = DEFAULT_MAX_SIZES

    def __post_init__(self) -> None:
        if isinstance(self.max_sizes, bool) or not isinstance(self.max_sizes, int) or self.max_sizes < 1:
            raise ValueError(f"max_sizes must be a whole number of at least 1, got {self.max_sizes!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown click engine {self.engine!r}; choose one of {ENGINES}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {self.compile!r}; choose one of {COMPILE_MODES}")

    @property
    def cache_path(self) -> Path:
        return engine_cache_root(self.cache_dir)


class EngineShapeError(ValueError):
    """An input whose shape differs from the one the compiled model was built for."""


def resolve_engine(requested: str, model: InterFormer, device: torch.device,
                   flags: set[str] | None = None) -> tuple[str, list[str]]:
    """The engine that will run for `requested` on this model, device and CPU, and why each step fell back."""
    reasons: list[str] = []
    engine = requested
    if engine == "fast":
        engine = "openvino-bf16" if native_bf16(flags) else "openvino-f32"
        if engine == "openvino-f32":
            reasons.append("fast: this CPU has no native bf16 (amx_bf16 / avx512_bf16), using openvino-f32")
    if engine == "openvino-bf16" and not native_bf16(flags):
        reasons.append("openvino-bf16: this CPU has no native bf16 (amx_bf16 / avx512_bf16), using openvino-f32")
        engine = "openvino-f32"
    if engine.startswith("openvino"):
        why = None
        if device.type != "cpu":
            why = f"the predictor runs on {device.type}, OpenVINO runs on the CPU"
        elif model.neck.has_refine and model.config.zoom_in.enabled:
            why = "this model's zoom-in refine stages crop a different shape per click; compiled graphs are static"
        else:
            why = openvino_available()
        if why is not None:
            reasons.append(f"{engine}: {why}; using torch")
            engine = "torch"
    return engine, reasons


class ClickEngine(Protocol):
    name: str

    def margin(self, x0: torch.Tensor, ref_label: torch.Tensor, cache: IMSACache, roi: Roi | None) -> np.ndarray:
        """logit1 - logit0 on the padded canvas (the size of ref_label [1, 1, H, W]), float32 numpy."""

    def answering(self, x0: torch.Tensor, ref_label: torch.Tensor, cache: IMSACache) -> "ClickEngine":
        """The engine that answers inputs of these shapes now (itself, or its torch fallback while a background
        conversion is under way). A session pins it, so that all its clicks run on one engine."""


class TorchEngine:
    """The reference: the model's own `decode` in PyTorch fp32."""

    name = "torch"

    def __init__(self, model: InterFormer) -> None:
        self.model = model

    def answering(self, x0: torch.Tensor, ref_label: torch.Tensor, cache: IMSACache) -> "TorchEngine":
        return self

    def margin(self, x0: torch.Tensor, ref_label: torch.Tensor, cache: IMSACache, roi: Roi | None) -> np.ndarray:
        pyramid = [x0, None, None, None]  # with cached keys/values only level 0 is read
        logits = self.model.decode(pyramid, ref_label, roi=roi, cache=cache)  # type: ignore[arg-type]
        return upsample_margin(logits[:, 1:2] - logits[:, 0:1], tuple(ref_label.shape[-2:]))


class ConvPatchMerging(nn.Module):
    """`PatchMerging` rewritten for the runtime: the same function with no unfold and no token transposes.

    PatchMerging is unfold(3x3, stride 2, pad 1) -> LayerNorm over the 9C values p of a patch (zero padding
    included) -> Linear. With W the Linear weight and g, b the LayerNorm's, each output is
    (W g) . (p - mean(p)) / sqrt(var(p) + eps) + W b, which becomes a strided 3x3 convolution. Every statistic
    is taken about a centre, never as a difference of squares (mean(p^2) - mean(p)^2 cancels catastrophically in
    bf16 on activations with a spatial offset, and loses bits in f32): with mu_q the channel mean of pixel q and
    d = x - mu its centred values, p - mean(p) splits into d (within a pixel) and mu_q - mean(p) (between the
    patch's 9 pixels), so var(p) = mean_q(mean_c d^2) + mean_q((mu_q - mean(p))^2) and the output is
    conv3x3(d, W g) + (per-position channel sums of W g) . (mu_q - mean(p)). The 9 pixel means of each patch
    come from a one-channel strided convolution with one-hot kernels. In f32 it matches PatchMerging to ~1e-6;
    in bf16 its error stays within a small factor of PatchMerging's own bf16 error (tests/test_click_engine.py).
    It removes the runtime's im2col and reference-kernel transposes (bench/profile_click_network.py).
    """

    def __init__(self, merging: PatchMerging) -> None:
        super().__init__()
        w = merging.reduction.weight.detach()
        gamma, beta = merging.norm.weight.detach(), merging.norm.bias.detach()
        kernel = (w * gamma[None, :]).reshape(w.shape[0], w.shape[1] // 9, 3, 3)  # unfold is channel-major
        self.register_buffer("kernel", kernel.contiguous())
        self.register_buffer("position_sums", kernel.sum(1).reshape(w.shape[0], 9, 1, 1).contiguous())
        self.register_buffer("picker", torch.eye(9).reshape(9, 1, 3, 3))  # the 3x3 neighbourhood as 9 channels
        self.register_buffer("bias", (w @ beta).reshape(1, -1, 1, 1))
        self.eps = merging.norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (1, 1, 1, 1))  # the zeros the LayerNorm sees: their mean and spread are 0
        pixel_mean = padded.mean(1, keepdim=True)
        centred = padded - pixel_mean
        spread = (centred * centred).mean(1, keepdim=True)
        neighbours = F.conv2d(pixel_mean, self.picker, stride=2)
        between = neighbours - neighbours.mean(1, keepdim=True)
        var = F.avg_pool2d(spread, 3, stride=2) + (between * between).mean(1, keepdim=True)
        y = F.conv2d(centred, self.kernel, stride=2) + F.conv2d(between, self.position_sums)
        return y * torch.rsqrt(var + self.eps) + self.bias


class _ClickNetwork(nn.Module):
    """The per-click network with flat tensor inputs, as the runtime converts it: the stride-4 margin out
    (upsampled outside: OpenCV's bilinear resize of one channel is ~10x faster than the runtime's). It runs a
    copy of the neck whose patch merging is `ConvPatchMerging` (the model itself is untouched)."""

    def __init__(self, model: InterFormer) -> None:
        super().__init__()
        self.neck = copy.deepcopy(model.neck)
        for stage in self.neck.stages:
            if isinstance(getattr(stage, "downsample", None), PatchMerging):
                stage.downsample = ConvPatchMerging(stage.downsample)
        self.head = model.decode_head

    def forward(self, x0: torch.Tensor, ref_label: torch.Tensor, *kv: torch.Tensor) -> torch.Tensor:
        cache = IMSACache([(kv[2 * i], kv[2 * i + 1]) for i in range(len(kv) // 2)])
        features = self.head.features(self.neck([x0, None, None, None], ref_label, cache=cache))  # type: ignore[list-item]
        # logit1 - logit0 as one classifier row (w1 - w0, b1 - b0): no cancellation of two rounded logits.
        w, b = self.head.conv_seg.weight, self.head.conv_seg.bias
        return F.conv2d(features, w[1:2] - w[0:1], b[1:2] - b[0:1])


def weights_digest(model: InterFormer) -> str:
    """The click network's weights and config as the key of its converted models."""
    return weights_key(model.config, model.neck, model.decode_head)


Signature = tuple[tuple[tuple[int, ...], str], ...]  # per input: its shape and numpy dtype name

# The dtypes a compiled click network takes, whatever the caller passes: the stride-4 map and the keys/values
# in f32 (the graph computes in f32 or bf16), the reference-label map as uint8 (its values are 0-4, spec §4.1).
FEATURE_DTYPE, LABEL_DTYPE = np.float32, np.uint8


def canonical_inputs(x0: torch.Tensor, ref_label: torch.Tensor,
                     cache: IMSACache) -> tuple[list[torch.Tensor] | None, str | None]:
    """The click network's inputs [x0, ref_label, k0, v0, ...] in the dtypes it is compiled for (cast where they
    differ: float features to f32; an integer or bool label map to uint8 when its values fit exactly, as an
    int64 `np.full(size, UNKNOWN)` does), or (None, why) where a cast would change the values (a float or
    out-of-range label map): torch then answers as it would."""
    if ref_label.dtype.is_floating_point or ref_label.dtype.is_complex:
        return None, f"a reference-label map of {ref_label.dtype}"
    if ref_label.dtype not in (torch.uint8, torch.bool):
        wide = ref_label.to(torch.int64)  # min/max exist for every dtype here (not for uint16/32/64)
        if wide.numel() and (int(wide.min()) < 0 or int(wide.max()) > 255):
            return None, f"a {ref_label.dtype} reference-label map with values outside 0..255"
    if ref_label.dtype != torch.uint8:
        ref_label = ref_label.to(torch.uint8)
    features = [x0, *(t for kv in cache.keys_values for t in kv)]
    if any(not t.dtype.is_floating_point for t in features):
        return None, f"features of {[str(t.dtype) for t in features if not t.dtype.is_floating_point][0]}"
    features = [t if t.dtype == torch.float32 else t.float() for t in features]
    return [features[0], ref_label, *features[1:]], None


class OpenVINOEngine:
    """The click network compiled by OpenVINO, one static model per padded size, converted on first use.

    At most `max_sizes` compiled sizes are held (least recently used evicted): each holds the compiled network,
    its infer request and that request's input buffers (tens of MiB for `small`, hundreds for Light at large
    sizes), and a photo collection has hundreds of padded sizes. An evicted size is compiled again from the saved
    IR on its next click (~0.2-1 s, no conversion): the same files, the same masks."""

    def __init__(self, model: InterFormer, precision: str, cache_dir: Path,
                 threads: Callable[[], int] = torch.get_num_threads, background: bool = False,
                 max_sizes: int = DEFAULT_MAX_SIZES) -> None:
        import openvino as ov

        if precision not in ("f32", "bf16"):
            raise ValueError(f"precision must be f32 or bf16, got {precision!r}")
        if max_sizes < 1:
            raise ValueError(f"max_sizes must be at least 1, got {max_sizes}")
        self.name = f"openvino-{precision}"
        self.precision = precision
        self.model = model
        self.cache_dir = cache_dir
        self.max_sizes = max_sizes
        self._threads = threads
        self._core = ov.Core()
        # compiled sizes, least recently used first; sizes the runtime could not take stay on torch (`_failed`)
        self._compiled: OrderedDict[Signature, tuple] = OrderedDict()
        self._failed: set[Signature] = set()
        self._evicted: set[Signature] = set()  # compiled once: a pinned session's next click recompiles them
        self._entries = threading.Lock()  # guards the three above (short holds, never during a build)
        self._lock = threading.Lock()  # one build at a time
        self._digest: str | None = None
        self._fallback = TorchEngine(model)
        self._unusable_logged: set[str] = set()
        self.background = background
        self._pending: dict[Signature, threading.Thread] = {}
        # per size: weak references to the (x0, cache) whose tensors the infer request's own input buffers
        # hold now (weak: the engine never keeps an image's features alive; a dead one reads as a change)
        self._loaded: dict[Signature, tuple[weakref.ref, weakref.ref]] = {}

    @staticmethod
    def _signature(inputs: list[torch.Tensor]) -> Signature:
        """The shapes and dtypes of the inputs (after `canonical_inputs`: the ones the compiled model takes)."""
        return tuple((tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in inputs)

    def _ir_path(self, signature: Signature) -> Path:
        if self._digest is None:
            self._digest = weights_digest(self.model)
        size = "x".join(str(v) for v in signature[1][0][-2:])
        shape_key = hashlib.sha256(repr(signature).encode()).hexdigest()[:12]
        # "v6": the graph's version (ConvPatchMerging, centred statistics); one IR serves both precisions. The
        # key holds the OpenVINO release and every input's shape and dtype: an IR converted by another release
        # or for other dtypes is never read for these.
        return self.cache_dir / self._digest / f"click_v6_{runtime_tag()}_{size}_{shape_key}.xml"

    @staticmethod
    def _mismatch(ports, signature: Signature) -> str | None:
        """Why a model's inputs (`ports`) are not the signature's shapes and dtypes, else None."""
        found = tuple((tuple(int(d) for d in p.get_shape()), str(np.dtype(p.get_element_type().to_dtype())))
                      for p in ports)
        return None if found == signature else f"its inputs are {list(found)}, expected {list(signature)}"

    def _build(self, signature: Signature, inputs: list[torch.Tensor]):
        import openvino as ov

        def convert():
            log.info("converting the click network for input %s with OpenVINO (once per size)", signature[1][0])
            with torch.no_grad():
                network = _ClickNetwork(self.model).eval()
                return ov.convert_model(network, example_input=tuple(inputs),
                                        input=[(list(t.shape), t.dtype) for t in inputs])

        # Always the saved IR: a freshly converted model can compile to kernels that round differently (2e-7),
        # and a size must answer the same in the process that converted it and in every later one. An IR whose
        # inputs differ from these (shapes or dtypes) is converted again.
        ov_model = read_or_convert(self._core, self._ir_path(signature), convert, log,
                                   check=lambda m: self._mismatch(m.inputs, signature))
        config = compile_settings(self.precision, self._threads())
        compiled = self._core.compile_model(ov_model, "CPU", config)
        why = self._mismatch(compiled.inputs, signature)
        if why is not None:
            raise EngineShapeError(f"the compiled click network does not take these inputs: {why}")
        return compiled, compiled.create_infer_request(), threading.Lock()

    def _build_or_fallback(self, signature: Signature, inputs: list[torch.Tensor]) -> tuple:
        try:
            return self._build(signature, inputs)
        except Exception as e:  # the runtime could not take this graph: the reference answers
            log.warning("click engine fallback: %s cannot compile the click network for %s (%s: %s; cache entry %s); "
                        "using torch for this size", self.name, signature[1][0], type(e).__name__, e,
                        self._ir_path(signature))
            return (None, None, None)

    def _store(self, signature: Signature, entry: tuple) -> None:
        """Keep a built entry (a failed one as torch for good); evict the least recently used beyond max_sizes."""
        with self._entries:
            self._evicted.discard(signature)
            if entry[0] is None:
                self._failed.add(signature)
                return
            self._compiled[signature] = entry
            self._compiled.move_to_end(signature)
            while len(self._compiled) > self.max_sizes:
                old, _ = self._compiled.popitem(last=False)
                self._loaded.pop(old, None)
                self._evicted.add(old)
                log.info("%s: released the compiled click network for %s (more than %d sizes held)", self.name,
                         old[1][0], self.max_sizes)

    def _lookup(self, signature: Signature) -> tuple | None:
        with self._entries:
            if signature in self._failed:
                return (None, None, None)
            entry = self._compiled.get(signature)
            if entry is not None:
                self._compiled.move_to_end(signature)
            return entry

    def _build_in_background(self, signature: Signature, inputs: list[torch.Tensor]) -> None:
        entry = self._build_or_fallback(signature, inputs)
        with self._lock:
            self._store(signature, entry)
            self._pending.pop(signature, None)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait for background conversions under way; True when none is left."""
        for thread in list(self._pending.values()):
            thread.join(timeout)
        return not self._pending

    def _request(self, signature: Signature, inputs: list[torch.Tensor]):
        entry = self._lookup(signature)
        if entry is not None:
            return entry
        with self._lock:
            entry = self._lookup(signature)
            if entry is not None:
                return entry
            # A size compiled before and evicted is compiled again now, even in background mode: its saved IR is
            # read (no conversion), and the sessions pinned to this engine must keep answering on it.
            if self.background and signature not in self._evicted:
                if signature not in self._pending:
                    log.info("%s: converting the click network for %s in the background; torch answers this size "
                             "until it is ready", self.name, signature[1][0])
                    thread = threading.Thread(target=self._build_in_background, name="click-engine-convert",
                                              args=(signature, [t.clone() for t in inputs]), daemon=True)
                    self._pending[signature] = thread
                    thread.start()
                return (None, None, None)
            entry = self._build_or_fallback(signature, inputs)
            self._store(signature, entry)
        return entry

    def _give_up(self, signature: Signature, error: Exception) -> None:
        """A compiled size whose inference failed answers on torch for good in this process: the failure (out
        of memory, a runtime fault) would recur, and a click must never wait on one that fails every time."""
        with self._entries:
            self._compiled.pop(signature, None)
            self._loaded.pop(signature, None)
            self._failed.add(signature)
        log.error("click engine fallback: %s failed running the click network for %s (%s: %s); torch answers "
                  "this size from now on", self.name, signature[1][0], type(error).__name__, error)

    def _unusable(self, why: str) -> "TorchEngine":
        if why not in self._unusable_logged:
            self._unusable_logged.add(why)
            log.warning("click engine fallback: %s takes no %s; torch answers these clicks", self.name, why)
        return self._fallback

    def answering(self, x0: torch.Tensor, ref_label: torch.Tensor, cache: IMSACache) -> ClickEngine:
        """Itself when this size's compiled model is ready (blocking mode: converted now), else the torch
        fallback: background mode starts the conversion; a size the runtime could not take stays on torch."""
        inputs, why = canonical_inputs(x0, ref_label, cache)
        if inputs is None:
            return self._unusable(why)
        compiled, _, _ = self._request(self._signature(inputs), inputs)
        return self if compiled is not None else self._fallback

    def margin(self, x0: torch.Tensor, ref_label: torch.Tensor, cache: IMSACache, roi: Roi | None) -> np.ndarray:
        if roi is not None:
            raise ValueError(f"{self.name} has no zoom-in refine stages to crop (roi {roi})")
        inputs, why = canonical_inputs(x0, ref_label, cache)
        if inputs is None:
            return self._unusable(why).margin(x0, ref_label, cache, roi)
        signature = self._signature(inputs)
        compiled, request, lock = self._request(signature, inputs)
        if compiled is None:
            return self._fallback.margin(x0, ref_label, cache, roi)
        try:
            low = self._infer(signature, inputs, request, lock, cache)
        except EngineShapeError as e:  # a compiled model that does not take these inputs: never a guessed mask
            log.error("click engine: %s; torch answers this click", e)
            return self._fallback.margin(x0, ref_label, cache, roi)
        except Exception as e:  # the runtime failed while running (memory at a huge size, a broken kernel)
            self._give_up(signature, e)
            return self._fallback.margin(x0, ref_label, cache, roi)
        h, w = ref_label.shape[-2:]
        # Bilinear with half-pixel centres: the same function as F.interpolate(align_corners=False),
        # within float rounding (measured <= 2e-6).
        return cv2.resize(low, (int(w), int(h)), interpolation=cv2.INTER_LINEAR)

    def _infer(self, signature: Signature, inputs: list[torch.Tensor], request, lock, cache: IMSACache) -> np.ndarray:
        """The stride-4 margin of the compiled model for `inputs` (canonical), a copy of its output."""
        x0 = inputs[0]
        with lock:  # an infer request serves one call at a time
            # Inputs are copied into the runtime's own (aligned, padded) buffers: its vector kernels may read
            # past the end of a tensor, which over a shared numpy buffer can touch an unmapped page; each copy
            # checks shape and dtype against the compiled graph's (static) input, never guessing. Only the
            # reference-label map changes between clicks on one image: the stride-4 map and the keys/values
            # (about 20 MB at 512x512) are copied when the image changes, not on every click.
            loaded = self._loaded.get(signature)
            if loaded is None or loaded[0]() is not x0 or loaded[1]() is not cache:
                self._loaded.pop(signature, None)
                for i, t in enumerate(inputs):
                    if i != 1:
                        _copy_into(request.get_input_tensor(i), t)
                self._loaded[signature] = (weakref.ref(x0), weakref.ref(cache))
            _copy_into(request.get_input_tensor(1), inputs[1])
            request.infer()
            return request.get_output_tensor(0).data[0, 0].copy()


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    if not t.is_contiguous():
        t = t.contiguous()
    return t.numpy()


def _copy_into(dst, t: torch.Tensor) -> None:
    """Copy a tensor into an infer request's input buffer of the same shape and dtype (never a silent cast)."""
    src, buf = _as_numpy(t), dst.data
    if src.dtype != buf.dtype or src.shape != buf.shape:
        raise EngineShapeError(f"input of {src.dtype} {src.shape} for a buffer of {buf.dtype} {buf.shape}")
    np.copyto(buf, src)


def add_click_engine_arguments(parser, compile_default: str = "blocking") -> None:
    """The click-engine options, the same in the backend CLI and the jobs (see `click_engine_config`); a
    server passes compile_default="background" so that no annotator's click waits for a conversion."""
    parser.add_argument("--click-engine", choices=ENGINES, default="torch",
                        help="what runs each click: torch (exact fp32 reference), openvino-f32 (same masks, faster), "
                        "openvino-bf16 (fastest, on CPUs with AMX / AVX512-BF16), fast (bf16 where native, else "
                        "f32); falls back with a logged reason (default: %(default)s)")
    parser.add_argument("--engine-cache", type=absolute_folder, default=None, metavar="DIR",
                        help=f"folder for the runtime's converted models: click networks, and the image encoder where it "
                        f"runs on openvino (default: ${CACHE_ENV}, else ~/.cache/interformer/click-engine)")
    parser.add_argument("--engine-compile", choices=COMPILE_MODES, default=compile_default,
                        help="a new padded size: wait for its conversion (blocking: every click on the engine "
                        "asked for) or convert in the background while torch answers (default: %(default)s)")
    parser.add_argument("--engine-max-sizes", type=COUNT, default=DEFAULT_MAX_SIZES, metavar="N",
                        help="compiled padded sizes an OpenVINO click engine holds in memory at once (tens of MiB "
                        "each; the least recently used is released and compiled again from the disk cache in "
                        "~0.2-1 s when needed) (default: %(default)s)")


def click_engine_config(args) -> ClickEngineConfig:
    """The ClickEngineConfig of parsed `add_click_engine_arguments` options."""
    return ClickEngineConfig(args.click_engine, cache_dir=args.engine_cache, compile=args.engine_compile,
                             max_sizes=args.engine_max_sizes)


def build_engine(config: ClickEngineConfig, model: InterFormer, device: torch.device,
                 flags: set[str] | None = None) -> ClickEngine:
    """The engine for `config` on this model and device, falling back (with one logged line) where needed."""
    name, reasons = resolve_engine(config.engine, model, device, flags)
    for reason in reasons:
        log.warning("click engine fallback: %s", reason)
    if name == "torch":
        return TorchEngine(model)
    return OpenVINOEngine(model, name.split("-", 1)[1], config.cache_path, background=config.compile == "background",
                          max_sizes=config.max_sizes)


def upsample_margin(low: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (align_corners=False) upsample of a [1, 1, h, w] margin to the padded canvas, float32 numpy."""
    return F.interpolate(low, size=size, mode="bilinear", align_corners=False)[0, 0].float().cpu().numpy()
