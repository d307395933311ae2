"""Encode engines: what runs the image encoder (MAE ViT + SimpleFPN), once per image, offline.

  torch     PyTorch: fp32 (the reference) or bf16 autocast (`Predictor(encode_precision="bf16")`).
  openvino  the same backbone compiled by OpenVINO: f32 computes the same function (relative RMS ~1e-6 to 1e-5
            of the pyramid), bf16 (CPUs with AMX / AVX512-BF16) is within ~1 % RMS. On 2 EPYC cores, Light:
            f32 0.42x torch fp32 at 512², 0.18x at 1024²; bf16 0.23x / 0.10x (docs/encoding.md).

One conversion per weights serves every image size and batch: the backbone is converted with dynamic batch,
height and width. Whatever torch derives from the size, the nearest-resized absolute position embedding and each
layer's [heads, 1+N, 1+N] relative-position bias, is gathered in the graph by a token index, an input computed
per size in Python (`token_index`). Traced per size instead, those bias matrices become constants (0.8 GB per
layer at 1024²; conversion took 250 s per size). The converted model is saved as IR under the engine cache
(interformer.runtime.engine_cache_root, keyed by a hash of the weights) with the sha256 of its files, so a later
process or another actor on the node reads it in about a second instead of converting it again (~20 s for Light)
and a damaged entry is converted again; a file lock makes actors that start together convert once.

Whatever the runtime cannot take (OpenVINO not importable, a CUDA predictor, a failed conversion) falls back to
torch with one logged reason; bf16 on a CPU without native bf16 runs the runtime's f32.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .modeling.fpn import MAEWithSimpleFPN
from .modeling.vit import keeps_training_tables, nearest_grid_index
from .runtime import compile_settings, native_bf16, openvino_available, read_or_convert, runtime_tag, weights_key

log = logging.getLogger("interformer.encode_engine")

ENCODE_ENGINES = ("torch", "openvino")
ENCODE_PRECISIONS = ("fp32", "bf16")
IR_VERSION = "encoder_v1"  # the graph below; bump it when the graph changes so old IR is never read


def token_index(grid: tuple[int, int], window: int) -> torch.Tensor:
    """[1 + h*w] long: the cls token, then for each patch of an h x w grid the index (1-based, after cls) of the
    training-window token that torch's nearest resize picks for it: the gather that resizes the position
    embedding and, applied to both axes, the relative-position bias (`MAEViT.resized_pos_embed`,
    `RelPosAttention.bias_matrix`). At the training token count it is the identity, as the official code
    resizes only when the count differs (`keeps_training_tables`)."""
    if keeps_training_tables(grid, window):
        return torch.arange(1 + grid[0] * grid[1])
    idx = nearest_grid_index((window, window), grid) + 1
    return torch.cat([idx.new_zeros(1), idx])


class EncoderNetwork(nn.Module):
    """The backbone with no size-dependent constants, as the runtime converts it: forward(img, token_index)
    computes what `MAEWithSimpleFPN.forward(img)` computes (bit for bit in torch), with the size-dependent
    gathers driven by `token_index`."""

    def __init__(self, backbone: MAEWithSimpleFPN) -> None:
        super().__init__()
        indices = [layer.attn.relative_position_index for layer in backbone.layers]
        if any(not torch.equal(indices[0], i) for i in indices[1:]):
            raise ValueError("the layers' relative position indices differ; the encoder network shares one")
        self.backbone = backbone
        self.register_buffer("relative_position_index", indices[0].clone())

    def forward(self, img: torch.Tensor, token_index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vit = self.backbone
        patches = vit.patch_embed.projection(img)
        b, c, h, w = patches.shape
        x = torch.cat([vit.cls_token.expand(b, -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
        x = x + vit.pos_embed[:, token_index]
        bias_index = self.relative_position_index[token_index][:, token_index]
        for layer in vit.layers:
            bias = layer.attn.relative_position_bias_table[bias_index].permute(2, 0, 1)
            x = x + layer.gamma_1 * layer.attn(layer.ln1(x), bias)
            x = x + layer.gamma_2 * layer.ffn(layer.ln2(x))
        return tuple(vit.fpn(x[:, 1:].transpose(1, 2).reshape(b, c, h, w)))


def check_encode_names(engine: str, precision: str) -> None:
    """ValueError unless `engine` and `precision` name an encode engine and precision."""
    if engine not in ENCODE_ENGINES:
        raise ValueError(f"unknown encode engine {engine!r}; choose one of {ENCODE_ENGINES}")
    if precision not in ENCODE_PRECISIONS:
        raise ValueError(f"encode precision must be one of {ENCODE_PRECISIONS}, got {precision!r}")


def resolve_encode_engine(engine: str, precision: str, device: torch.device,
                          flags: set[str] | None = None) -> tuple[str, str, list[str]]:
    """(engine, precision) that will run for the requested pair on this device and CPU, and why each step fell
    back. Unknown names raise ValueError."""
    check_encode_names(engine, precision)
    reasons: list[str] = []
    if engine == "openvino":
        why = (f"the predictor runs on {device.type}, OpenVINO runs on the CPU" if device.type != "cpu"
               else openvino_available())
        if why is not None:
            reasons.append(f"encode engine openvino: {why}; using torch")
            return "torch", precision, reasons
        if precision == "bf16" and not native_bf16(flags):
            reasons.append("encode engine openvino: this CPU has no native bf16 (amx_bf16 / avx512_bf16), "
                           "using f32")
            precision = "fp32"
    return engine, precision, reasons


def backbone_digest(backbone: nn.Module) -> str:
    """The backbone's config and weights as the key of its converted model."""
    return weights_key(getattr(backbone, "cfg", None), backbone)


class TorchEncoder:
    """The backbone in PyTorch, fp32 or under bf16 autocast; the pyramid comes back in fp32."""

    def __init__(self, backbone: nn.Module, precision: str = "fp32") -> None:
        self.backbone = backbone
        self.precision = precision
        self.name = f"torch-{precision}"

    def prepare(self) -> bool:
        """Nothing to build for torch; True (the engine asked for runs)."""
        return True

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> list[torch.Tensor]:
        if self.precision == "fp32":
            return list(self.backbone(batch))
        with torch.autocast(batch.device.type, dtype=torch.bfloat16):
            pyramid = self.backbone(batch)
        return [p.float() for p in pyramid]


class OpenVINOEncoder:
    """The backbone compiled by OpenVINO with dynamic shapes: converted once per weights (or read from the
    cache), compiled once, one infer request serving batches of any size in turn."""

    def __init__(self, backbone: MAEWithSimpleFPN, precision: str, cache_dir: Path,
                 threads: Callable[[], int] = torch.get_num_threads) -> None:
        check_encode_names("openvino", precision)
        self.backbone = backbone
        self.precision = precision
        self.name = f"openvino-{'f32' if precision == 'fp32' else 'bf16'}"
        self.cache_dir = cache_dir
        self._threads = threads
        self._window = backbone.cfg.window
        self._patch = backbone.cfg.patch_size
        self._fallback = TorchEncoder(backbone, precision)
        self._lock = threading.Lock()
        self._request = None
        self._failed: str | None = None
        self._failed_sizes: set[tuple[int, int]] = set()  # padded sizes the runtime failed to run: torch's now

    def ir_path(self) -> Path:
        return self.cache_dir / backbone_digest(self.backbone) / f"{IR_VERSION}_{runtime_tag()}.xml"

    def _convert(self):
        import openvino as ov

        log.info("converting the image encoder with OpenVINO (once per weights, every size): %s", self.ir_path())
        grid = (self._window, self._window)
        img = torch.zeros(1, 3, grid[0] * self._patch, grid[1] * self._patch)
        with torch.no_grad():
            return ov.convert_model(EncoderNetwork(self.backbone).eval(),
                                    example_input=(img, token_index(grid, self._window)),
                                    input=[([-1, 3, -1, -1], torch.float32), ([-1], torch.int64)])

    def _build(self):
        import openvino as ov

        core = ov.Core()
        ov_model = read_or_convert(core, self.ir_path(), self._convert, log)
        settings = compile_settings("f32" if self.precision == "fp32" else "bf16", self._threads())
        compiled = core.compile_model(ov_model, "CPU", settings)
        if len(compiled.outputs) != 4 or len(compiled.inputs) != 2:
            raise RuntimeError(f"compiled encoder has {len(compiled.inputs)} inputs and {len(compiled.outputs)} "
                               "outputs, expected 2 and 4")
        return compiled.create_infer_request()

    def _ready(self) -> bool:
        if self._request is None and self._failed is None:
            try:
                self._request = self._build()
            except Exception as e:  # the runtime could not take the encoder: the reference answers
                self._failed = f"{type(e).__name__}: {e}"
                log.warning("encode engine fallback: %s cannot build the image encoder (%s); using torch",
                            self.name, self._failed)
        return self._request is not None

    def prepare(self) -> bool:
        """Convert (or read) and compile now, so that the first image does not wait for it (a serving process
        calls it at start); False when it fell back to torch."""
        with self._lock:
            return self._ready()

    def __call__(self, batch: torch.Tensor) -> list[torch.Tensor]:
        if batch.device.type != "cpu" or batch.dim() != 4 or batch.shape[1] != 3:
            raise ValueError(f"the encoder takes a CPU batch [B, 3, H, W], got {tuple(batch.shape)} on {batch.device}")
        with self._lock:  # one infer request, one batch at a time
            if not self._ready():
                return self._fallback(batch)
            grid = (batch.shape[2] // self._patch, batch.shape[3] // self._patch)
            size = tuple(batch.shape[2:])
            if size not in self._failed_sizes:
                try:
                    self._request.infer({0: np.ascontiguousarray(batch.detach().float().numpy()),
                                         1: token_index(grid, self._window).numpy()})
                    return [torch.from_numpy(self._request.get_output_tensor(i).data.copy()) for i in range(4)]
                except Exception as e:  # the runtime failed while running (memory at a huge size, a fault)
                    self._failed_sizes.add(size)
                    log.error("encode engine fallback: %s failed encoding a batch of %s (%s: %s); torch encodes "
                              "images of this padded size from now on", self.name, tuple(batch.shape),
                              type(e).__name__, e)
            return self._fallback(batch)


def add_encode_engine_argument(parser, purpose: str = "what runs the image encoder") -> None:
    """The --encode-engine option, the same in the encode job, pre-annotation and the backend."""
    parser.add_argument("--encode-engine", choices=ENCODE_ENGINES, default="torch",
                        help=f"{purpose}: torch, or openvino on CPU (f32: the same pyramid within ~1e-5 RMS, 2.3-5.4x "
                        "faster on 2 cores; converted once per weights, ~20 s for Light, into --engine-cache, then "
                        "read in ~1 s; falls back to torch with a logged reason) (default: %(default)s)")


def build_encoder(engine: str, precision: str, backbone: MAEWithSimpleFPN, device: torch.device, cache_dir: Path,
                  flags: set[str] | None = None) -> TorchEncoder | OpenVINOEncoder:
    """The encoder for the requested engine and precision, falling back (with one logged line) where needed."""
    name, precision, reasons = resolve_encode_engine(engine, precision, device, flags)
    for reason in reasons:
        log.warning("encode engine fallback: %s", reason)
    if name == "torch":
        return TorchEncoder(backbone, precision)
    return OpenVINOEncoder(backbone, precision, cache_dir)
