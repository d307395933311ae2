"""Where a click's time goes (a benchmark, not a test): the figures the docs quote about parts of a click.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_click_parts.py            # all three parts
    python bench/bench_click_parts.py --parts step --clicks 10

1. step (Light, random weights, --size, --threads): per click, interleaved on the same features: our click
   step (`InteractiveSession.add_click`), the official order (bench/official_step.py), UPerHead's 3x3
   `fpn_bottleneck` alone on its real input (MACs from its weight and input shapes), and the output stage
   both ways on the real low-resolution logits: two-channel upsample + argmax (official) against upsample
   of the logit margin + threshold (ours). The share of our gain that the thresholding accounts for is
   (argmax path - margin path) / (official step - our step), medians of one run.
2. preannotate (the seeded `small` model, whose I-MSA and head are Light's; 1 thread): the pre-annotation
   worker's per-object work (`pipeline.preannotation.segment_object`: click simulator with its distance
   transforms, click steps, IoU, crop, RLE) on coarse-mask prompts of GrabCut objects at native size, with
   target IoU 1.0 so every object gets --max-clicks clicks; the process CPU time spent inside
   `Predictor.predict_margin` (I-MSA + head + margin upsample) against the whole.
3. rle (480x640 masks): label-studio-sdk's `brush.mask2rle` against `connectors.rle.mask_to_rle`
   (which writes the same bytes; tests/test_backend_rle.py).
Figures are medians; compare ratios within one run, since shared machines are noisy.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first torch import

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]
from official_step import official_click_step  # noqa: E402
from results_io import begin, save  # noqa: E402

from interformer import Predictor, load_model  # noqa: E402
from interformer.predictor import set_cpu_threads  # noqa: E402

SHARED = BENCH.parent.parent / "shared" / "data"


def _ms(values: list[float]) -> float:
    return round(1e3 * statistics.median(values), 2)


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def step_parts(size: int, clicks: int, threads: int) -> dict:
    set_cpu_threads(threads)
    torch.manual_seed(0)
    model = load_model(None, variant="light", device="cpu")
    official_model = load_model(None, variant="light", device="cpu")
    official_model.load_state_dict(model.state_dict())
    predictor = Predictor(model, device="cpu")
    head = predictor.model.decode_head
    captured: dict[str, torch.Tensor] = {}
    head.fpn_bottleneck.register_forward_hook(lambda m, inp, out: captured.__setitem__("fpn_in", inp[0].detach()))
    head.register_forward_hook(lambda m, inp, out: captured.__setitem__("logits", out.detach()))
    image = np.random.default_rng(1).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    feats = predictor.encode(image)
    pyramid = [p.cpu() for p in feats.pyramid]
    session = predictor.session(feats)
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {k: [] for k in ("ours", "official", "fpn_bottleneck", "argmax_2ch", "margin_thr")}
    with torch.inference_mode():
        for k in range(clicks):
            r, c = int(rng.integers(0, size)), int(rng.integers(0, size))
            positive = bool(k == 0 or rng.random() < 0.6)
            _, t_official = _timed(official_click_step, official_model, pyramid, session.ref_label.copy(), r, c, positive)
            _, t_ours = _timed(session.add_click, r, c, positive)
            _, t_fpn = _timed(head.fpn_bottleneck, captured["fpn_in"])
            logits = captured["logits"]

            def argmax_2ch():
                return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False).argmax(1) == 1

            def margin_thr():
                margin = logits[:, 1:2] - logits[:, 0:1]
                return F.interpolate(margin, size=(size, size), mode="bilinear", align_corners=False)[0, 0] > 0

            _, t_argmax = _timed(argmax_2ch)
            _, t_margin = _timed(margin_thr)
            if k >= 2:  # warm-up
                for name, t in zip(times, (t_ours, t_official, t_fpn, t_argmax, t_margin)):
                    times[name].append(t)
    weight = head.fpn_bottleneck.conv.weight
    h, w = captured["fpn_in"].shape[-2:]
    macs = int(weight.shape[0] * weight.shape[1] * weight.shape[2] * weight.shape[3] * h * w)
    med = {name: _ms(v) for name, v in times.items()}
    gain = med["official"] - med["ours"]
    return {"size": f"{size}x{size}", "threads": threads, "clicks_timed": len(times["ours"]),
            "median_ms": med, "fpn_bottleneck_gmac": round(macs / 1e9, 2),
            "fpn_bottleneck_input": list(captured["fpn_in"].shape),
            "fpn_bottleneck_share_of_our_step": round(med["fpn_bottleneck"] / med["ours"], 3),
            "speedup": round(med["official"] / med["ours"], 2),
            "output_stage_saving_ms": round(med["argmax_2ch"] - med["margin_thr"], 2),
            "output_stage_share_of_gain": round((med["argmax_2ch"] - med["margin_thr"]) / gain, 3) if gain > 0 else None}


def preannotate_parts(objects: int, max_clicks: int) -> dict:
    from pipeline.datasets import grabcut
    from pipeline.encoding import EncoderSpec, build_predictor
    from pipeline.preannotation import ClickPolicy, segment_object
    from pipeline.prompts import ObjectPrompt, encode_mask

    set_cpu_threads(1)
    predictor = build_predictor(EncoderSpec(variant="small"), device="cpu")
    inner = {"cpu": 0.0, "calls": 0}
    original = predictor.predict_margin

    def counted(*args, **kwargs):
        c0 = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            inner["cpu"] += time.process_time() - c0
            inner["calls"] += 1

    predictor.predict_margin = counted
    policy = ClickPolicy(target_iou=1.0, max_clicks=max_clicks)
    total_cpu, sizes = 0.0, set()
    for ref in grabcut(SHARED / "GrabCut")[:objects]:
        sample = ref.load()
        feats = predictor.encode(sample.image)
        gt = sample.gt == 1
        sizes.add(f"{gt.shape[1]}x{gt.shape[0]}")
        prompt = ObjectPrompt(key=f"bench:{ref.sample_id}", image_id=ref.image_id, label="object", kind="mask",
                              size=gt.shape, coarse=encode_mask(gt))
        c0 = time.process_time()
        result = segment_object(predictor, feats, prompt, policy)
        total_cpu += time.process_time() - c0
        assert result.status == "ok", result
    return {"objects": objects, "clicks_per_object": max_clicks, "image_sizes": sorted(sizes), "threads": 1,
            "cpu_ms_per_click": round(1e3 * total_cpu / inner["calls"], 1),
            "predict_margin_cpu_ms_per_click": round(1e3 * inner["cpu"] / inner["calls"], 1),
            "predict_margin_share": round(inner["cpu"] / total_cpu, 3)}


def rle_parts(repeats: int) -> dict:
    from label_studio_sdk.converter import brush

    from connectors.rle import mask_to_rle

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:480, :640]
    sdk, ours = [], []
    for _ in range(repeats):
        cy, cx, rad = rng.integers(100, 380), rng.integers(100, 540), rng.integers(40, 120)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= rad**2
        a, t_sdk = _timed(brush.mask2rle, mask.astype(np.uint8) * 255)
        b, t_ours = _timed(mask_to_rle, mask)
        assert list(a) == list(b)
        sdk.append(t_sdk)
        ours.append(t_ours)
    return {"mask": "480x640 disks", "repeats": repeats, "sdk_mask2rle_ms_median": _ms(sdk),
            "sdk_mask2rle_ms_max": round(1e3 * max(sdk), 2), "ours_ms_median": _ms(ours),
            "ours_ms_max": round(1e3 * max(ours), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=("step", "preannotate", "rle"), default=["step", "preannotate", "rle"])
    p.add_argument("--size", type=int, default=512, help="square image side for the step part (default: %(default)s)")
    p.add_argument("--clicks", type=int, default=10, help="clicks in the step part, 2 of them warm-up (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in the step part (default: %(default)s)")
    p.add_argument("--objects", type=int, default=6, help="GrabCut objects in the preannotate part (default: %(default)s)")
    p.add_argument("--max-clicks", type=int, default=5, help="clicks per object there (default: %(default)s)")
    p.add_argument("--rle-repeats", type=int, default=30, help="masks in the rle part (default: %(default)s)")
    p.add_argument("--out", default=None, help="raw results file (default: bench/results/bench_click_parts-UTC.json)")
    a = p.parse_args(argv)
    started = begin()
    figures: dict = {}
    if "step" in a.parts:
        figures["step"] = s = step_parts(a.size, a.clicks, a.threads)
        print(f"step {s['size']}, {a.threads} threads, medians ms: {s['median_ms']}; fpn_bottleneck "
              f"{s['fpn_bottleneck_gmac']} GMAC = {s['fpn_bottleneck_share_of_our_step']:.0%} of our step; "
              f"thresholding the margin saves {s['output_stage_saving_ms']} ms = {s['output_stage_share_of_gain']} "
              f"of the gain over the official order ({s['speedup']}x)")
    if "preannotate" in a.parts:
        figures["preannotate"] = q = preannotate_parts(a.objects, a.max_clicks)
        print(f"pre-annotation, {q['objects']} objects x {q['clicks_per_object']} clicks ({q['image_sizes']}): "
              f"{q['cpu_ms_per_click']} ms CPU per click, of which predict_margin (I-MSA + head) "
              f"{q['predict_margin_cpu_ms_per_click']} ms = {q['predict_margin_share']:.0%}")
    if "rle" in a.parts:
        figures["rle"] = r = rle_parts(a.rle_repeats)
        print(f"RLE of a 480x640 mask: label-studio-sdk {r['sdk_mask2rle_ms_median']} ms median "
              f"(max {r['sdk_mask2rle_ms_max']}), ours {r['ours_ms_median']} ms (max {r['ours_ms_max']})")
    save("bench_click_parts", figures, started, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
