"""Click -> mask latency of the Label Studio ML backend over HTTP (a benchmark, not a test).

Starts the real backend (`python -m connectors`, local Ray, CPU actors) on a table of GrabCut images
encoded here, then simulates 1, 4 and 16 annotators clicking concurrently, each on their own image,
each request carrying the region's whole click list as Label Studio sends it. Reports the median /
p90 / p99 client latency per level, the split of a request's time (from the backend's
Server-Timing header: parse, fetch, interact, rle, actor, server total; the rest is HTTP + Ray) and
the bare interact step (`InteractiveSession.add_click` + mask, same model, size, threads, features)
measured in this process right before each 1-annotator request (same features and clicks, same moment's
machine load, never overlapping the request). Shared machines are noisy: read the paired ratio.

    python bench/bench_backend.py                      # 480x640, 2 actors x 1 thread, 1/4/16 annotators
    python bench/bench_backend.py --size 240 320 --actors 1 --threads 2 --levels 1 4
    python bench/bench_backend.py --think-s 1 --per-annotator 16 --levels 8 16 24 32 --click-engine fast

Before the first level, one click on every image warms the actors (features read, the click engine's
padded size compiled; the server runs with --engine-compile, blocking by default here), and is not counted.
With --think-s each annotator starts at a random moment within one think time (seeded; people do not click in
step) and waits that long after every answer (a person looking at the mask), and the
summary names the most annotators whose p99 over all requests stays within --p99-target-ms at that level and every smaller
one run (the serving capacity).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in the actors; must precede the first torch import

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from connectors.rle import mask_to_rle  # noqa: E402
from interformer.checkpoint import load_model, save_checkpoint  # noqa: E402
from interformer.click_engine import add_click_engine_arguments, click_engine_config  # noqa: E402
from interformer.predictor import Predictor, set_cpu_threads  # noqa: E402
from pipeline.feature_store import EncodedImage, FeatureReader, FeatureStore, feature_rows  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from results_io import begin, save  # noqa: E402

GRABCUT = ROOT.parent / "shared" / "data" / "GrabCut" / "data_GT"
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="tag" toName="image"><Label value="object"/></BrushLabels>'
    '<KeyPointLabels name="kp" toName="image" smart="true"><Label value="object" smart="true"/></KeyPointLabels>'
    "</View>"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"),
                   help="size every image is resized to (default: 480 640)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16],
                   help="numbers of concurrent annotators (default: 1 4 16)")
    p.add_argument("--requests", type=int, default=64,
                   help="requests per level, split evenly over its annotators (default: 64)")
    p.add_argument("--region-clicks", type=int, default=8,
                   help="clicks per region before an annotator starts a new region (default: 8)")
    p.add_argument("--actors", type=int, default=2, help="serving actors (default: 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per actor and for the bare step (default: cores / actors)")
    p.add_argument("--variant", default="small",
                   help="model variant, random init (small/light share the click step) (default: small)")
    p.add_argument("--think-s", type=float, default=0.0,
                   help="seconds an annotator waits after each answer before the next click (default: 0)")
    p.add_argument("--per-annotator", type=int, default=None,
                   help="requests per annotator (default: --requests split evenly over the level's annotators)")
    p.add_argument("--p99-target-ms", type=float, default=300.0,
                   help="the p99 latency that defines serving capacity (default: %(default)s)")
    add_click_engine_arguments(p)
    p.add_argument("--out", default="outputs/bench_backend", help="folder for results.json and the plot")
    p.add_argument("--keep", action="store_true", help="keep the temporary table and server log")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_images(n: int, size: tuple[int, int]) -> list[np.ndarray]:
    files = sorted(GRABCUT.glob("*.jpg"))
    if not files:
        raise SystemExit(f"no GrabCut images under {GRABCUT}")
    h, w = size
    return [np.asarray(Image.open(files[i % len(files)]).convert("RGB").resize((w, h), Image.BILINEAR))
            for i in range(n)]


def build_table(work: Path, variant: str, images: list[np.ndarray]) -> tuple[Path, str]:
    """A seeded random-init checkpoint whose masks are neither empty nor full, and the encoded table."""
    torch.manual_seed(0)
    model = load_model(None, variant=variant)
    probe = Predictor(load_model(None, variant=variant), device="cpu")
    probe.model.load_state_dict(model.state_dict())
    h, w = images[0].shape[:2]
    margin = probe.session(probe.encode(images[0])).add_click(h // 2, w // 2, True).margin
    with torch.no_grad():
        model.decode_head.conv_seg.bias[1] -= float(np.median(margin))
    ckpt = work / f"{variant}.pth"
    save_checkpoint(model, ckpt)
    predictor = Predictor(load_model(ckpt), device="cpu")
    items = [EncodedImage(f"bench-{i}", f"bench-{i}.png", "", predictor.encode(img))
             for i, img in enumerate(tqdm(images, desc="encode", unit="img"))]
    FeatureStore(str(work / "db"), "features").add(feature_rows(items, predictor.fingerprint))
    return ckpt, predictor.fingerprint


def click_sequence(size: tuple[int, int], n: int, seed: int) -> list[tuple[int, int, bool]]:
    """A positive click near the centre, then clicks spread over the image, 60 % positive."""
    h, w = size
    rng = np.random.default_rng(seed)
    out = [(h // 2 + int(rng.integers(-h // 10, h // 10)), w // 2 + int(rng.integers(-w // 10, w // 10)), True)]
    out += [(int(rng.integers(0, h)), int(rng.integers(0, w)), bool(rng.random() < 0.6)) for _ in range(n - 1)]
    return out


class BareSteps:
    """The bare interact step in this process (add_click + mask, then RLE timed apart), on the same stored
    features and click lists as the simulated annotator, run right before each of its requests."""

    def __init__(self, ckpt: Path, db: Path, fingerprint: str, threads: int, engine) -> None:
        set_cpu_threads(threads)
        self.predictor = Predictor(load_model(ckpt), device="cpu", engine=engine)
        self.reader = FeatureReader(str(db), fingerprint)
        self.sessions: dict[str, object] = {}

    def step(self, image_id: str, region: str, r: int, c: int, pos: bool) -> tuple[float, float]:
        session = self.sessions.get(region)
        if session is None:
            session = self.sessions[region] = self.predictor.session(self.reader.get(image_id))
        t0 = time.perf_counter()
        mask = session.add_click(r, c, pos).mask
        t1 = time.perf_counter()
        mask_to_rle(mask)
        return (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3


def keypoint(r: int, c: int, pos: bool, size: tuple[int, int], item_id: str) -> dict:
    h, w = size
    return {"original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"x": (c + 0.5) * 100.0 / w, "y": (r + 0.5) * 100.0 / h, "width": 0.5,
                      "keypointlabels": ["object"]},
            "is_positive": pos, "id": item_id, "from_name": "kp", "to_name": "image", "type": "keypointlabels"}


def server_timing(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


async def annotator(client: httpx.AsyncClient, url: str, index: int, level: int, n_requests: int,
                    region_clicks: int, size: tuple[int, int], records: list[dict], bar: tqdm,
                    bare: BareSteps | None, think_s: float = 0.0) -> None:
    image_id = f"bench-{index % 16}"
    sent = 0
    region = 0
    if think_s > 0:  # people do not start in step: each begins at its own (seeded) moment of one think time
        await asyncio.sleep(float(np.random.default_rng(level * 1000 + index).uniform(0, think_s)))
    while sent < n_requests:
        clicks = click_sequence(size, region_clicks, seed=level * 1000 + index * 50 + region)
        items = []
        for k, (r, c, pos) in enumerate(clicks):
            if sent >= n_requests:
                break
            items.append(keypoint(r, c, pos, size, f"L{level}-a{index}-r{region}-{k}"))
            paired = {}
            if bare is not None:  # same work, same moment's machine load, no overlap with the request
                step_ms, rle_ms = await asyncio.to_thread(bare.step, image_id, items[0]["id"], r, c, pos)
                paired = {"bare_ms": step_ms, "bare_rle_ms": rle_ms}
            body = {"tasks": [{"id": index, "data": {"image": f"bench-{index}.png", "image_id": image_id}}],
                    "project": "1.1", "label_config": LABEL_CONFIG, "params": {"context": {"result": items}}}
            t0 = time.perf_counter()
            resp = await client.post(f"{url}/predict", json=body)
            latency = (time.perf_counter() - t0) * 1e3
            resp.raise_for_status()
            records.append({"level": level, "annotator": index, "click": k, "latency_ms": latency, **paired,
                            "actor": int(resp.headers.get("x-backend-actor", -1)),
                            **server_timing(resp.headers.get("server-timing", ""))})
            sent += 1
            bar.update(1)
            if think_s > 0:
                await asyncio.sleep(think_s)
        region += 1


def warm_up(url: str, size: tuple[int, int], images: int = 16) -> float:
    """One click on every image before anything is measured, so that each actor has read its images'
    features and its click engine has compiled this padded size (a serving actor warms the sizes it sees;
    with --engine-compile blocking these clicks wait for it). Returns the seconds it took."""
    t0 = time.perf_counter()
    h, w = size
    with httpx.Client(timeout=600) as client:
        for i in range(images):
            body = {"tasks": [{"id": 10_000 + i, "data": {"image": f"bench-{i}.png", "image_id": f"bench-{i}"}}],
                    "project": "1.1", "label_config": LABEL_CONFIG,
                    "params": {"context": {"result": [keypoint(h // 2, w // 2, True, size, f"warm-{i}")]}}}
            client.post(f"{url}/predict", json=body).raise_for_status()
    return time.perf_counter() - t0


def capacity(levels: list[int], p99: dict[int, float], target_ms: float) -> int:
    """The most annotators served at p99 <= target: the largest level such that it and every smaller level
    run met the target (0 when the smallest did not)."""
    best = 0
    for level in sorted(levels):
        if p99[level] > target_ms:
            break
        best = level
    return best


async def probe_health(client: httpx.AsyncClient, url: str, stop: asyncio.Event, out: list[float]) -> None:
    """GET /health every 100 ms while the annotators click (Label Studio allows it 1 s)."""
    while not stop.is_set():
        t0 = time.perf_counter()
        (await client.get(f"{url}/health", timeout=5)).raise_for_status()
        out.append((time.perf_counter() - t0) * 1e3)
        await asyncio.sleep(0.1)


async def run_level(url: str, level: int, n_requests: int, region_clicks: int, size: tuple[int, int],
                    bare: BareSteps | None, think_s: float = 0.0,
                    per_annotator: int | None = None) -> tuple[list[dict], list[float]]:
    records: list[dict] = []
    health: list[float] = []
    per = per_annotator or max(1, n_requests // level)
    limits = httpx.Limits(max_connections=level + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        stop = asyncio.Event()
        prober = asyncio.create_task(probe_health(client, url, stop, health))
        with tqdm(total=per * level, desc=f"{level} annotator(s)", unit="req") as bar:
            await asyncio.gather(*(annotator(client, url, i, level, per, region_clicks, size, records, bar, bare,
                                             think_s) for i in range(level)))
        stop.set()
        await prober
    return records, health


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarise(records: list[dict], levels: list[int], actors: int) -> dict:
    paired = [r for r in records if "bare_ms" in r and r["click"] > 0]
    bare_ms = [r["bare_ms"] for r in paired]
    out = {"bare": {"step_median_ms": float(np.median(bare_ms)), "step_p99_ms": pct(bare_ms, 99),
                    "rle_median_ms": float(np.median([r["bare_rle_ms"] for r in paired])), "steps": len(paired),
                    "paired_ratio_median": float(np.median([r["latency_ms"] / r["bare_ms"] for r in paired]))},
           "levels": {}}
    for level in levels:
        rows = [r for r in records if r["level"] == level]
        warm = [r for r in rows if r["click"] > 0]
        lat = [r["latency_ms"] for r in warm]
        split = {k: float(np.median([r.get(k, 0.0) for r in warm]))
                 for k in ("parse", "fetch", "interact", "rle", "actor_total", "total")}
        split["queue_and_ray"] = float(np.median([r["total"] - r["actor_total"] - r["parse"] for r in warm]))
        split["http"] = float(np.median([r["latency_ms"] - r["total"] for r in warm]))
        actor_of = {r["annotator"]: r["actor"] for r in rows}  # each annotator has its own image
        images_per_actor = np.bincount(list(actor_of.values()), minlength=actors)
        out["levels"][level] = {
            "requests": len(rows), "warm_requests": len(warm), "images_per_actor": images_per_actor.tolist(),
            "median_ms": float(np.median(lat)), "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99), "max_ms": max(lat),
            # every request, a region's first click included: what the serving capacity is judged on
            "p99_all_ms": pct([r["latency_ms"] for r in rows], 99),
            "first_click_median_ms": float(np.median([r["latency_ms"] for r in rows if r["click"] == 0])),
            "median_over_bare": float(np.median(lat)) / out["bare"]["step_median_ms"],
            "split_median_ms": split,
        }
    return out


PART_LABELS = {"interact": "interact (click step + mask + score)", "rle": "RLE", "fetch": "feature fetch",
               "parse": "parse body", "queue_and_ray": "queue + Ray call", "http": "HTTP (client + uvicorn)"}


def plot(summary: dict, records: list[dict], levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    data = [[r["latency_ms"] for r in records if r["level"] == lv and r["click"] > 0] for lv in levels]
    ax1.boxplot(data, whis=(1, 99), showfliers=True)
    ax1.set_xticks(range(1, len(levels) + 1), [str(lv) for lv in levels])
    ax1.axhline(summary["bare"]["step_median_ms"], color="tab:red", ls="--", label="bare interact step (median)")
    ax1.set_xlabel("concurrent annotators")
    ax1.set_ylabel("click -> mask over HTTP (ms)")
    ax1.set_yscale("log")
    ax1.legend(loc="upper left", fontsize=8)
    ax1.set_title("latency (whiskers: p1-p99)")
    parts = ["interact", "rle", "fetch", "parse", "queue_and_ray", "http"]
    bottom = np.zeros(len(levels))
    for part in parts:
        vals = np.maximum(np.array([summary["levels"][lv]["split_median_ms"][part] for lv in levels]), 0)
        ax2.bar([str(lv) for lv in levels], vals, bottom=bottom, label=PART_LABELS[part])
        bottom += vals
    ax2.set_xlabel("concurrent annotators")
    ax2.set_ylabel("median ms per request")
    ax2.set_title("where a request's time goes (medians)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = begin()
    size = tuple(args.size)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.actors)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_backend_"))
    server = None
    try:
        images = load_images(16, size)
        ckpt, fingerprint = build_table(work, args.variant, images)
        bare = BareSteps(ckpt, work / "db", fingerprint, threads, click_engine_config(args))
        port = free_port()
        log = open(work / "server.log", "w")
        server = subprocess.Popen(
            [sys.executable, "-m", "connectors", "--db", str(work / "db"), "--checkpoint", str(ckpt),
             "--port", str(port), "--actors", str(args.actors), "--threads", str(threads), "--log-level", "warning",
             "--click-engine", args.click_engine, "--engine-compile", args.engine_compile,
             *(["--engine-cache", args.engine_cache] if args.engine_cache else [])],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"backend did not start (exit code {server.poll()}):\n"
                                 f"{(work / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        warm_s = warm_up(url, size)
        t0 = time.perf_counter()
        records: list[dict] = []
        health: dict[int, list[float]] = {}
        for level in args.levels:
            level_records, health[level] = asyncio.run(
                run_level(url, level, args.requests, args.region_clicks, size, bare if level == 1 else None,
                          args.think_s, args.per_annotator))
            records += level_records
        bench_s = time.perf_counter() - t0
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
        server = None
        summary = summarise(records, args.levels, args.actors)
        summary.update(size=list(size), actors=args.actors, threads=threads, variant=args.variant,
                       cpu_count=os.cpu_count(),
                       health_under_load_ms={lv: {"median": float(np.median(v)), "max": float(max(v)), "n": len(v)}
                                             for lv, v in health.items()},
                       loadavg_1min=os.getloadavg()[0], bench_s=bench_s, think_s=args.think_s,
                       click_engine=args.click_engine, p99_target_ms=args.p99_target_ms,
                       warm_up_s=round(warm_s, 2), engine_compile=args.engine_compile,
                       capacity_annotators=capacity(args.levels, {lv: summary["levels"][lv]["p99_all_ms"]
                                                                  for lv in args.levels}, args.p99_target_ms))
        (out / "results.json").write_text(json.dumps({"summary": summary, "records": records}, indent=1))
        plot(summary, records, args.levels, out / "latency.png")
        print_table(summary, args.levels)
        print(f"\nwrote {out / 'results.json'} and {out / 'latency.png'}")
        save("bench_backend", summary, started)  # the per-request records stay in --out
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def print_table(summary: dict, levels: list[int]) -> None:
    b = summary["bare"]
    print(f"\n{summary['size'][0]}x{summary['size'][1]} (HxW), {summary['actors']} actor(s) x {summary['threads']} "
          f"thread(s), {summary['cpu_count']} cores, load avg {summary['loadavg_1min']:.1f}")
    print(f"bare interact step (paired with the 1-annotator requests): median {b['step_median_ms']:.1f} ms, "
          f"p99 {b['step_p99_ms']:.1f} ms; RLE {b['rle_median_ms']:.1f} ms; median of per-request "
          f"HTTP latency / bare step: {b['paired_ratio_median']:.2f}")
    print(f"click engine {summary['click_engine']}, think time {summary['think_s']} s: the most annotators with "
          f"p99 (all requests) <= {summary['p99_target_ms']:.0f} ms (that level and every smaller one run): "
          f"{summary['capacity_annotators']}; warm-up (one click per image) {summary['warm_up_s']} s")
    health = summary["health_under_load_ms"]
    print("/health while clicking: " + ", ".join(
        f"{lv} annotator(s) median {h['median']:.1f} ms, max {h['max']:.1f} ms" for lv, h in health.items()))
    print("\n| annotators | images per actor | requests | median ms | p90 ms | p99 ms | p99 ms, all | median / bare "
          "| first click ms | interact | rle | fetch | parse | queue + Ray | HTTP |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for lv in levels:
        s = summary["levels"][lv]
        sp = s["split_median_ms"]
        print(f"| {lv} | {'/'.join(map(str, s['images_per_actor']))} | {s['requests']} | {s['median_ms']:.1f} "
              f"| {s['p90_ms']:.1f} | {s['p99_ms']:.1f} | {s['p99_all_ms']:.1f} | {s['median_over_bare']:.2f} "
              f"| {s['first_click_median_ms']:.1f} | {sp['interact']:.1f} | {sp['rle']:.1f} | {sp['fetch']:.2f} "
              f"| {sp['parse']:.2f} | {sp['queue_and_ray']:.1f} | {sp['http']:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
