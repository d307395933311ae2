"""The Ray actor pool: routing by image id, masks equal to the in-process model, restart + retry,
on-demand encoding in the encoder actor. Runs on a private local Ray."""
from __future__ import annotations

import asyncio
import os
import signal

import numpy as np
import pytest
import ray
from backend_support import encode_into_store, grabcut_images, make_checkpoint, pixel, reference_mask, write_png

from connectors.actors import ActorPool
from connectors.engine import EngineConfig
from pipeline.image_access import ImageAccess
from connectors.rle import rle_to_mask
from connectors.segment import SegmentError, SegmentRequest

SIZE = (64, 96)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("actors")
    ckpt = make_checkpoint(tmp / "small.pth")
    images = grabcut_images(3, SIZE)
    paths = [write_png(img, tmp / "images" / f"{name}.png") for name, img in images]
    encode_into_store(ckpt, tmp / "db", "features", [(f"img-{i}", str(p), img)
                                                      for i, (p, (_, img)) in enumerate(zip(paths[:2], images))])
    cfg = EngineConfig(db=str(tmp / "db"), table="features", checkpoint=str(ckpt), variant="small", threads=1,
                       access=ImageAccess(allowed_roots=(str((tmp / "images").resolve()),)))
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    p = ActorPool(cfg, num_actors=2, actor_cpus=0.5, max_restarts=2)
    p.wait_ready(timeout_s=180)
    yield {"pool": p, "tmp": tmp, "ckpt": ckpt, "paths": paths}
    p.shutdown()
    if started:
        ray.shutdown()


def run(pool, req):
    return asyncio.run(pool.segment(req))


def ref(env, image_id, clicks):
    return reference_mask(env["ckpt"], env["tmp"] / "db", "features", image_id, clicks)


def test_actor_answers_the_models_mask_and_keeps_the_session(pool):
    p = pool["pool"]
    clicks = (pixel(50, 50, SIZE), pixel(10, 20, SIZE, False))
    first = run(p, SegmentRequest(clicks=clicks[:1], original_size=SIZE, image_id="img-0", region_key="r"))
    second = run(p, SegmentRequest(clicks=clicks, original_size=SIZE, image_id="img-0", region_key="r"))
    assert first.actor == second.actor
    assert (first.path, second.path) == ("replay", "step")
    np.testing.assert_array_equal(rle_to_mask(second.rle, *SIZE), ref(pool, "img-0", list(clicks)))
    assert second.area == int(ref(pool, "img-0", list(clicks)).sum())


def test_a_killed_actor_is_restarted_and_the_request_retried(pool):
    p = pool["pool"]
    clicks = (pixel(30, 30, SIZE), pixel(70, 60, SIZE))
    index = run(p, SegmentRequest(clicks=clicks[:1], original_size=SIZE, image_id="img-1", region_key="k")).actor
    pid = ray.get(p.actors[index].ping.remote())
    os.kill(pid, signal.SIGKILL)
    res = run(p, SegmentRequest(clicks=clicks, original_size=SIZE, image_id="img-1", region_key="k"))
    assert res.path == "replay"  # the restarted actor lost its sessions
    assert ray.get(p.actors[index].ping.remote()) != pid
    np.testing.assert_array_equal(rle_to_mask(res.rle, *SIZE), ref(pool, "img-1", list(clicks)))


def test_an_actor_dead_for_good_is_created_anew_and_health_tells_a_crash_loop(pool):
    """Ray's max_restarts count over an actor's whole life: a backend that loses nodes now and then used to
    answer 503 for good once they were used up, while /health still said ready. The pool creates a new actor
    (max_restarts + 1 times an hour at most: more is a crash loop, then 503 and not ready)."""
    p = pool["pool"]
    lone = ActorPool(p.cfg, num_actors=1, actor_cpus=0.25, encode_on_demand=False, max_restarts=0,
                     restart_timeout_s=120)
    try:
        lone.wait_ready(timeout_s=180)
        clicks = (pixel(30, 30, SIZE), pixel(70, 60, SIZE))
        run(lone, SegmentRequest(clicks=clicks[:1], original_size=SIZE, image_id="img-1", region_key="k"))
        os.kill(ray.get(lone.actors[0].ping.remote()), signal.SIGKILL)  # no restart left: dead for good
        res = run(lone, SegmentRequest(clicks=clicks, original_size=SIZE, image_id="img-1", region_key="k"))
        assert lone.recreated == 1 and lone.ready() and res.path == "replay"
        np.testing.assert_array_equal(rle_to_mask(res.rle, *SIZE), ref(pool, "img-1", list(clicks)))
        os.kill(ray.get(lone.actors[0].ping.remote()), signal.SIGKILL)  # again within the hour: a crash loop
        with pytest.raises(SegmentError) as failed:
            run(lone, SegmentRequest(clicks=clicks, original_size=SIZE, image_id="img-1", region_key="k"))
        assert failed.value.status == 503 and not lone.ready()
    finally:
        lone.shutdown()


def test_missing_features_are_encoded_by_the_encoder_actor(pool):
    p = pool["pool"]
    path = str(pool["paths"][2])
    res = run(p, SegmentRequest(clicks=(pixel(50, 50, SIZE),), original_size=SIZE, image_ref=path, region_key="x"))
    assert res.encoded_on_demand and res.image_id == path and res.timings_ms["encode"] > 0
    np.testing.assert_array_equal(rle_to_mask(res.rle, *SIZE), ref(pool, path, [pixel(50, 50, SIZE)]))
    again = run(p, SegmentRequest(clicks=(pixel(50, 50, SIZE),), original_size=SIZE, image_ref=path, region_key="y"))
    assert not again.encoded_on_demand


def test_errors_keep_their_status_across_ray(pool):
    p = pool["pool"]
    with pytest.raises(SegmentError) as e:
        run(p, SegmentRequest(clicks=(pixel(5, 5, SIZE),), original_size=SIZE, image_id="nope", region_key="z"))
    assert e.value.status == 404 and "'nope' has no stored features" in e.value.message
    with pytest.raises(SegmentError) as e:
        run(p, SegmentRequest(clicks=(pixel(5, 5, SIZE),), original_size=SIZE, image_ref="/etc/passwd"))
    assert e.value.status == 404 and "outside the allowed roots" in e.value.message


def test_the_on_demand_encoder_runs_the_engine_asked_for_and_is_ready_at_start(tmp_path, monkeypatch):
    """`--encode-engine openvino` on the backend: the encoder converts (into the engine cache) when it starts, not
    in an annotator's first request, and stores the features torch would (within the table's fp16); a failed
    conversion is named as torch's fallback and still encodes."""
    pytest.importorskip("openvino")
    from interformer.click_engine import ClickEngineConfig
    from connectors.engine import OnDemandEncoder
    from pipeline.feature_store import FeatureReader

    ckpt = make_checkpoint(tmp_path / "small.pth")
    (name, image), = grabcut_images(1, SIZE)
    path = write_png(image, tmp_path / "images" / f"{name}.png")
    access = ImageAccess(allowed_roots=(str((tmp_path / "images").resolve()),))

    def config(engine: str, db: str, cache: str = "engine-cache") -> EngineConfig:
        return EngineConfig(db=str(tmp_path / db), table="features", checkpoint=str(ckpt), variant="small",
                            threads=1, access=access, encode_engine=engine,
                            click_engine=ClickEngineConfig(cache_dir=str(tmp_path / cache)))

    encoder = OnDemandEncoder(config("openvino", "db"))
    assert encoder.encoder_name == "openvino-f32"
    assert list((tmp_path / "engine-cache").rglob("encoder_v1_*.sha256")), "converted at start"
    reference = OnDemandEncoder(config("torch", "db-torch"))
    assert reference.encoder_name == "torch-fp32"
    for enc in (encoder, reference):
        assert "vit_ms" in enc.encode("the-image", str(path))
    got, want = (FeatureReader(str(tmp_path / db), encoder.fingerprint).get("the-image") for db in ("db", "db-torch"))
    for g, w in zip(got.pyramid, want.pyramid):
        assert float((g - w).norm() / w.norm()) < 2e-3  # fp16 storage rounding, not a different function

    import openvino

    def broken(*args, **kwargs):
        raise RuntimeError("conversion failed (test)")

    monkeypatch.setattr(openvino, "convert_model", broken)
    fallback = OnDemandEncoder(config("openvino", "db-fallback", cache="empty-cache"))
    assert fallback.encoder_name == "torch-fp32 (the fallback of openvino-f32)"
    assert "vit_ms" in fallback.encode("the-image", str(path))
    with pytest.raises(ValueError, match="unknown encode engine"):
        config("tensorrt", "db")


def test_an_encoder_actor_dead_for_good_is_created_anew_and_the_image_encoded(pool):
    """The encoder actor's death (its node lost, killed for memory) used to answer 503 at once and for good
    ('the encoder actor is unavailable'): no image without features could be labelled until the backend was
    restarted. Now it is waited for or created anew, as serving actors are, within the same crash-loop bound;
    its crash loop is a 503 for images to encode while images with features are still served."""
    p = pool["pool"]
    paths = [str(write_png(img, pool["tmp"] / "images" / f"enc-{k}.png"))
             for k, (_, img) in enumerate(grabcut_images(2, SIZE))]
    lone = ActorPool(p.cfg, num_actors=1, actor_cpus=0.25, encode_on_demand=True, max_restarts=0,
                     restart_timeout_s=120)
    try:
        lone.wait_ready(timeout_s=180)
        click = (pixel(50, 50, SIZE),)
        os.kill(ray.get(lone.encoder.ping.remote()), signal.SIGKILL)  # no restart left: dead for good
        res = run(lone, SegmentRequest(clicks=click, original_size=SIZE, image_ref=paths[0], region_key="e"))
        assert res.encoded_on_demand and lone.recreated == 1 and lone.ready()
        np.testing.assert_array_equal(rle_to_mask(res.rle, *SIZE), ref(pool, paths[0], list(click)))
        os.kill(ray.get(lone.encoder.ping.remote()), signal.SIGKILL)  # again within the hour: a crash loop
        with pytest.raises(SegmentError) as failed:
            run(lone, SegmentRequest(clicks=click, original_size=SIZE, image_ref=paths[1], region_key="f"))
        assert failed.value.status == 503 and "encoder actor" in str(failed.value)
        assert lone.ready()
        served = run(lone, SegmentRequest(clicks=click, original_size=SIZE, image_id="img-0", region_key="g"))
        np.testing.assert_array_equal(rle_to_mask(served.rle, *SIZE), ref(pool, "img-0", list(click)))
    finally:
        lone.shutdown()
