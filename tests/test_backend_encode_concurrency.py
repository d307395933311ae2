"""An on-demand encode never holds up the serving actor: annotators clicking on stored images get their masks
while another task's image is still being fetched and encoded (seconds; up to the download timeout against a
slow image host). Private local Ray with ONE serving actor, so both requests go to the same actor; the image
host is a loopback server that holds the image until the test lets it go."""
from __future__ import annotations

import asyncio
import http.server
import io
import threading

import numpy as np
import pytest
import ray
from backend_support import encode_into_store, grabcut_images, make_checkpoint, pixel, reference_mask, write_png
from PIL import Image

from connectors.actors import ActorPool
from connectors.engine import EngineConfig
from connectors.rle import rle_to_mask
from connectors.segment import SegmentRequest
from pipeline.image_access import ImageAccess

SIZE = (64, 96)


class HeldImageHost:
    """Serves one PNG on loopback, answering only once `release` is set; `asked` is set when a request came."""

    def __init__(self, png: bytes) -> None:
        self.asked, self.release = threading.Event(), threading.Event()
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                host.asked.set()
                host.release.wait(60)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/slow.png"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("encode_concurrency")
    ckpt = make_checkpoint(tmp / "small.pth")
    (_, stored), (_, fresh) = grabcut_images(2, SIZE)
    path = write_png(stored, tmp / "images" / "stored.png")
    encode_into_store(ckpt, tmp / "db", "features", [("stored", str(path), stored)])
    buf = io.BytesIO()
    Image.fromarray(fresh).save(buf, format="PNG")
    host = HeldImageHost(buf.getvalue())
    cfg = EngineConfig(db=str(tmp / "db"), table="features", checkpoint=str(ckpt), variant="small", threads=1,
                       access=ImageAccess(storage_hosts=(host.url.split("/")[2],), allowed_networks=("127.0.0.0/8",),
                                         timeout_s=60.0))
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    pool = ActorPool(cfg, num_actors=1, actor_cpus=0.5)
    pool.wait_ready(timeout_s=180)
    yield {"pool": pool, "host": host, "tmp": tmp, "ckpt": ckpt}
    host.close()
    pool.shutdown()
    if started:
        ray.shutdown()


def test_clicks_on_stored_images_are_answered_while_another_image_encodes(env):
    pool, host = env["pool"], env["host"]
    click = (pixel(50, 50, SIZE),)

    async def scenario():
        encoding = asyncio.ensure_future(pool.segment(SegmentRequest(
            clicks=click, original_size=SIZE, image_ref=host.url, region_key="new")))
        while not host.asked.is_set():  # the encoder actor is now waiting for the image host
            if encoding.done():
                encoding.result()  # the encode failed before asking the host: its error
                pytest.fail("the encode finished without asking the image host")
            await asyncio.sleep(0.05)
        answers = [await pool.segment(SegmentRequest(clicks=click, original_size=SIZE, image_id="stored",
                                                     region_key=f"r{n}")) for n in range(3)]
        still_encoding = not encoding.done()
        host.release.set()
        return answers, still_encoding, await encoding

    answers, still_encoding, encoded = asyncio.run(scenario())
    assert still_encoding, "the clicks waited for the other image's encode"
    expected = reference_mask(env["ckpt"], env["tmp"] / "db", "features", "stored", list(click))
    for a in answers:
        assert a.actor == 0 and not a.encoded_on_demand
        np.testing.assert_array_equal(rle_to_mask(a.rle, *SIZE), expected)
    assert encoded.encoded_on_demand and encoded.image_id == host.url and encoded.timings_ms["encode"] > 0
    np.testing.assert_array_equal(rle_to_mask(encoded.rle, *SIZE), reference_mask(
        env["ckpt"], env["tmp"] / "db", "features", host.url, list(click)))
