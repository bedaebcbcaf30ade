"""`loupe serve --replicas N`: the same app as a Ray Serve deployment, each replica holding its own catalog."""

from __future__ import annotations

import logging
import time

from loupe.jobs.serve.command import url

log = logging.getLogger("loupe.serve")
APP_NAME = "loupe-serve"


def _replica_class():
    # Built on first use, so importing this module neither imports nor starts Ray Serve.
    from ray import serve

    @serve.deployment(name="catalog", ray_actor_options={"num_cpus": 1})
    @serve.ingress()
    class CatalogReplica:
        """One replica: the app over OUTPUT, loaded when the replica starts."""

        def __init__(self, output: str, endpoint_url: str | None, token: str | None):
            self.output, self.endpoint_url, self.token = output, endpoint_url, token

        def __serve_build_asgi_app__(self):
            from loupe.jobs.serve.app import create_app

            app = create_app(self.output, endpoint_url=self.endpoint_url, token=self.token)
            replica = serve.get_replica_context().replica_tag

            @app.middleware("http")
            async def which_replica(request, call_next):
                response = await call_next(request)
                response.headers["X-Loupe-Replica"] = replica
                return response

            return app

    return CatalogReplica


def start_deployment(
    output: str, *, replicas: int, host: str, port: int, token: str | None, endpoint_url: str | None
) -> str:
    """Deploy the app with `replicas` replicas on the connected Ray cluster; its URL once all are up.

    OUTPUT is opened here first, so a damaged OUTPUT or index is refused in one line rather
    than as replicas failing one after another on the cluster.
    """
    from ray import serve

    from loupe.jobs.serve.catalog import Catalog
    from loupe.jobs.serve.query import load_searchers

    load_searchers(Catalog.open(output, endpoint_url))
    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
    deployment = _replica_class().options(num_replicas=replicas)
    serve.run(deployment.bind(output, endpoint_url, token), name=APP_NAME, route_prefix="/", blocking=False)
    return url(host, port)


def serve_on_ray(
    output: str,
    *,
    replicas: int,
    host: str,
    port: int,
    token: str | None,
    endpoint_url: str | None,
    ray_address: str | None,
) -> None:
    """Serve OUTPUT with Ray Serve until interrupted, then shut Serve down."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=ray_address, log_to_driver=False, configure_logging=False)
    try:
        address = start_deployment(
            output, replicas=replicas, host=host, port=port, token=token, endpoint_url=endpoint_url
        )
        log.info("serving %s at %s with %d Ray Serve replicas", output, address, replicas)
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
