"""`python -m connectors`: start the Label Studio ML backend (HTTP server + CPU Ray actors)."""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from interformer.checkpoint import CheckpointError, check_checkpoint, model_version
from interformer.cli_types import COUNT, POSITIVE, SEED, integer
from interformer.click_engine import add_click_engine_arguments, click_engine_config
from interformer.encode_engine import add_encode_engine_argument
from interformer.config import CONFIGS, DEFAULT_MAX_ENCODE_MEMORY_GIB, PreprocessConfig

from pipeline.image_access import ImageAccess, ImageAccessError, add_image_access_arguments
from pipeline.ray_runtime import LOCAL, RayStartError, init_ray, live_node_resources
from pipeline.table_names import check_table_name

from .logs import get_logger, log_event, setup_logging
from .region_meta import REFINE_STARTS

log = get_logger("cli")

AUTH_PASS_ENV = ("ML_BACKEND_BASIC_AUTH_PASS", "BASIC_AUTH_PASS")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m connectors",
        description="Serve InterFormer masks to Label Studio: an ML backend whose CPU Ray actors turn an "
        "annotator's clicks into brush masks from features stored by jobs/encode.py.",
        epilog="Environment: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (images of tasks without features are "
        "fetched from that server, the --storage-host hosts it redirects to and the --allowed-root folders only); "
        "ML_BACKEND_BASIC_AUTH_PASS (or BASIC_AUTH_PASS) with --basic-auth-user. "
        "In Label Studio: Settings > Model > Connect model, URL http://HOST:PORT, interactive preannotations on.",
    )
    p.add_argument("--db", default="lancedb",
                   help="LanceDB root folder (or object-store URI) of the feature table (default: %(default)s)")
    p.add_argument("--table", default="features",
                   help="name of the feature table written by jobs/encode.py (default: %(default)s)")
    p.add_argument("--checkpoint", default=None,
                   help="InterFormer weights (.pth): the same file jobs/encode.py encoded with, otherwise the table "
                   "holds no features for this model. Without it, the seeded random init of jobs/encode.py "
                   "(--variant and --seed; for trying the pipeline only)")
    p.add_argument("--variant", choices=sorted(CONFIGS), default=None,
                   help="model variant; checked against the checkpoint (default: read from it), required without one")
    p.add_argument("--seed", type=SEED, default=0,
                   help="seed of the random init without --checkpoint, as given to jobs/encode.py (default: 0)")
    p.add_argument("--max-side", type=integer(32), default=None,
                   help="the longest-side resize jobs/encode.py used (part of the feature fingerprint)")
    p.add_argument("--max-encode-memory", type=POSITIVE, default=DEFAULT_MAX_ENCODE_MEMORY_GIB, metavar="GIB",
                   help="GiB of attention memory encoding an image on demand may take (as jobs/encode.py): a larger "
                   "image is answered 422 too_large, naming the --max-side that fits (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on, 0.0.0.0 for every interface (default: %(default)s)")
    p.add_argument("--port", type=integer(0, 65535), default=9090, help="TCP port to listen on (default: %(default)s)")
    p.add_argument("--actors", type=COUNT, default=1,
                   help="number of CPU serving actors; images are spread over them by id (default: %(default)s)")
    p.add_argument("--actor-cpus", type=POSITIVE, default=None,
                   help="Ray CPUs reserved per actor (default: the largest share with which every actor, the "
                   "encoder included, fits on the cluster's nodes: CPUs / (actors + 1) on one machine); a size "
                   "the nodes cannot all hold is refused at start")
    p.add_argument("--threads", type=COUNT, default=None,
                   help="torch threads per serving actor (default: this machine's cores / actors)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (e.g. ray://head:10001 or auto); default: start a local Ray")
    p.add_argument("--ray-cpus", type=COUNT, default=None, help="CPUs of the local Ray (default: all cores)")
    p.add_argument("--feature-cache-mb", type=POSITIVE, default=256.0,
                   help="memory each serving actor keeps for decoded features, in MiB; least recently used "
                   "images are dropped beyond it (default: %(default)s)")
    p.add_argument("--session-cache-mb", type=POSITIVE, default=512.0,
                   help="memory each serving actor keeps for interactive sessions (every click's state, for "
                   "undo, and the image's features), in MiB (default: %(default)s)")
    p.add_argument("--max-clicks", type=COUNT, default=100,
                   help="clicks of one region served per request; more get a 413 (default: %(default)s)")
    p.add_argument("--max-batch-items", type=COUNT, default=1000,
                   help="saved keypoints and rectangles of the tasks of one batch /predict (each at most one model "
                   "step); more get a 413 naming how many there are (default: %(default)s)")
    p.add_argument("--refine-from", choices=REFINE_STARTS, default="clicks",
                   help="a click on a pre-annotated region: continue the clicks its meta keeps (fewer corrective "
                   "clicks; the region's first click replays them) or start from its mask alone (no replay) "
                   "(default: %(default)s)")
    p.add_argument("--no-encode-on-demand", action="store_true",
                   help="answer 404 for images without features instead of encoding them on a CPU actor")
    add_image_access_arguments(p)
    p.add_argument("--basic-auth-user", default=os.environ.get("ML_BACKEND_BASIC_AUTH_USER"),
                   help="require HTTP basic auth with this user (default: $ML_BACKEND_BASIC_AUTH_USER); "
                   "the password comes from the environment")
    p.add_argument("--max-body-mb", type=POSITIVE, default=64.0,
                   help="largest request body accepted, in MiB (default: %(default)s)")
    p.add_argument("--max-restarts", type=integer(-1), default=3,
                   help="times Ray restarts a serving actor that died (default: %(default)s)")
    add_click_engine_arguments(p, compile_default="background")
    add_encode_engine_argument(p, "what encodes an image that has no stored features (on-demand encoding)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="level of the JSON logs on stderr; debug also logs /health calls (default: %(default)s)")
    return p


def _storage_problem(db: str, table: str) -> str | None:
    """Why --db/--table cannot be a feature table (said before Ray starts and the actors load a model), or None."""
    try:
        check_table_name(table)
    except ValueError as e:
        return f"--table: {e}"
    if "://" not in db and os.path.exists(db) and not os.path.isdir(db):
        return f"--db {db!r} is a file, not a LanceDB folder"
    return None


class ListenError(Exception):
    """The server cannot listen where it was asked to."""


def open_listener(host: str, port: int) -> socket.socket:
    """The server's socket, bound to host:port now (before the actors start), so that a bad address or a port
    in use is refused at once and nothing else can take the port meanwhile; port 0 binds a free one, which the
    socket names (`getsockname`). uvicorn serves on this very socket."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ListenError(f"--host {host!r}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if args.checkpoint is not None:
        try:  # the actors load it; a bad file is the user's error, reported before Ray starts
            args.variant = check_checkpoint(args.checkpoint, args.variant)
        except CheckpointError as e:
            print(f"error: --checkpoint: {e}", file=sys.stderr)
            return 2
    if args.checkpoint is None and args.variant is None:
        print("error: without --checkpoint, name the --variant of the random init jobs/encode.py used",
              file=sys.stderr)
        return 2
    try:
        ImageAccess.from_args(args)
    except (ImageAccessError, ValueError) as e:
        print(f"error: image access settings: {e}", file=sys.stderr)
        return 2
    problem = _storage_problem(args.db, args.table)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    password = next((os.environ[k] for k in AUTH_PASS_ENV if os.environ.get(k)), None)
    if args.basic_auth_user and not password:
        print(f"error: --basic-auth-user needs the password in ${AUTH_PASS_ENV[0]}", file=sys.stderr)
        return 2
    try:
        listener = open_listener(args.host, args.port)
    except ListenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _start_and_serve(args, listener, password)
    finally:
        listener.close()


def _start_and_serve(args: argparse.Namespace, listener: socket.socket, password: str | None) -> int:
    """Start (or join) Ray, then serve on `listener` until stopped."""
    import ray

    # Ray starts its workers at niceness 15 (batch work); serving actors answer people, so our local Ray
    # starts them at 0. (On an existing cluster the actors try to lower their niceness themselves.)
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Ray forks its processes in ray.init: start it before lancedb (imported by the engine) starts threads.
    try:
        init_ray(args.address or LOCAL, num_cpus=args.ray_cpus, job="backend")
    except RayStartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        return _serve(args, listener, password)
    finally:
        ray.shutdown()


def _mib(value: float) -> int:
    return int(value * 1024 * 1024)


def _serve(args: argparse.Namespace, listener: socket.socket, password: str | None) -> int:
    import uvicorn

    from .actors import ActorPool, default_actor_cpus, placement_problem
    from .engine import EngineConfig
    from .server import ServerSettings, create_app

    variant = args.variant
    access = ImageAccess.from_args(args)
    checkpoint = str(Path(args.checkpoint).resolve()) if args.checkpoint else None
    cfg = EngineConfig(
        db=args.db if "://" in args.db else str(Path(args.db).resolve()),  # actors may run in another cwd
        table=args.table,
        checkpoint=checkpoint,
        variant=variant,
        seed=args.seed,
        preprocess=PreprocessConfig(max_side=args.max_side, max_encode_memory_gib=args.max_encode_memory),
        feature_cache_bytes=_mib(args.feature_cache_mb),
        session_cache_bytes=_mib(args.session_cache_mb),
        threads=args.threads or max(1, (os.cpu_count() or 1) // args.actors),
        access=access,
        click_engine=click_engine_config(args),
        refine_from=args.refine_from,
        encode_engine=args.encode_engine,
    )
    settings = ServerSettings(
        model_version=model_version(checkpoint, variant, args.seed),
        basic_auth_user=args.basic_auth_user,
        basic_auth_pass=password,
        max_body_bytes=_mib(args.max_body_mb),
        max_clicks=args.max_clicks,
        max_batch_items=args.max_batch_items,
    )
    pool = None
    try:
        node_cpus = [float(r.get("CPU", 0.0)) for r in live_node_resources()]
        count = args.actors + (0 if args.no_encode_on_demand else 1)
        actor_cpus = args.actor_cpus or default_actor_cpus(count, node_cpus)
        problem = placement_problem(count, actor_cpus, node_cpus)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        pool = ActorPool(cfg, args.actors, actor_cpus, encode_on_demand=not args.no_encode_on_demand,
                         max_restarts=args.max_restarts, log_level=args.log_level)
        pool.wait_ready()
        app = create_app(settings, pool)
        port = listener.getsockname()[1]
        log_event(log, "serving", url=f"http://{args.host}:{port}", model_version=settings.model_version,
                  table=f"{cfg.db}/{cfg.table}", actors=args.actors, actor_cpus=actor_cpus, threads=cfg.threads,
                  click_engine=cfg.click_engine.engine,
                  encode_engine=None if args.no_encode_on_demand else cfg.encode_engine,
                  auth=bool(args.basic_auth_user), label_studio_url=cfg.access.label_studio_url)
        server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=5))
        server.run(sockets=[listener])
    finally:
        if pool is not None:
            pool.shutdown()
    return 0
