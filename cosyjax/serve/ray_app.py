"""Ray Serve deployment of the same FastAPI app (`cosyjax serve --ray --replicas N`; extra `[ray]`).

Each replica loads the model once and serves `create_app(...)` through `serve.ingress`, so the API is
the same as the single-process server; Ray Serve's HTTP proxy spreads requests over the replicas (no
router of our own). With GPUs, each replica gets one device (`num_gpus=1`: Ray sets
CUDA_VISIBLE_DEVICES, JAX sees that device only). Batching happens inside each replica.

Multi-node set-up (README text):

    # on the head node
    ray start --head --port 6379
    # on every other node (same Python environment, model folder at the same path)
    ray start --address HEAD_IP:6379
    # anywhere in the cluster: one replica per GPU across all nodes
    cosyjax serve --ray --ray-address auto --model-dir /models/Fun-CosyVoice3-0.5B --replicas 8 \
        --host 0.0.0.0 --port 8000 --api-key "$COSYJAX_API_KEY" --voices-dir /shared/cosyjax-voices

Ray's proxy listens on every node at --port. Uploaded voices are files: give all nodes one shared
--voices-dir (NFS or similar) so every replica sees every voice.
"""
from __future__ import annotations

import sys
import time

from cosyjax.serve.errors import ServeError

__all__ = ["build_deployment", "run_ray"]


def _import_serve():
    try:
        from ray import serve
    except ImportError as e:
        raise ServeError("cosyjax serve --ray needs the [ray] extra: pip install 'cosyjax[ray]'", status=501) from e
    return serve


def build_deployment(model_dir: str, config, tts_kwargs: dict, replicas: int = 1, gpus_per_replica: float = 0.0,
                     cpus_per_replica: float = 1.0):
    """A bound Ray Serve application: `replicas` copies of the speech app over `model_dir`."""
    serve = _import_serve()
    if replicas < 1:
        raise ServeError(f"replicas must be >= 1, got {replicas}")

    @serve.deployment(name="cosyjax_speech", num_replicas=int(replicas),
                      ray_actor_options={"num_gpus": float(gpus_per_replica), "num_cpus": float(cpus_per_replica)})
    @serve.ingress()
    class CosyJaxSpeech:
        def __init__(self, model_dir: str, config, tts_kwargs: dict):
            from cosyjax.api import CosyVoice
            from cosyjax.serve.cli import enable_compile_cache

            enable_compile_cache(config.compile_cache)  # this replica's process
            self.tts = CosyVoice.from_pretrained(model_dir, **tts_kwargs)
            self.config = config

        def __serve_build_asgi_app__(self):
            from cosyjax.serve.app import create_app

            return create_app(self.tts, self.config)

    return CosyJaxSpeech.bind(model_dir, config, dict(tts_kwargs))


def run_ray(args) -> int:
    """`cosyjax serve --ray`: deploy on a (local or given) Ray cluster and block until interrupted."""
    serve = _import_serve()
    import ray

    from cosyjax.serve.cli import _model_dir, config_from_args

    model_dir = _model_dir(args)
    config = config_from_args(args, model_dir)
    ray.init(address=args.ray_address, ignore_reinit_error=True)
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_deployment(model_dir, config, dict(dtype=args.dtype, attention=args.attention,
                                                   cache_dir=args.cache_dir, sampling=args.sampling),
                           replicas=args.replicas, gpus_per_replica=gpus)
    serve.run(app, name="cosyjax", route_prefix="/")
    print(f"Ray Serve: {args.replicas} replica(s) of {config.model_name} behind http://{args.host}:{args.port}",
          file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
