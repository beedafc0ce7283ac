"""GET /metrics on the gateway: its own metrics and every instance's, so one scrape sees the
whole system (`install_metrics(app, backend)`; open, never behind auth).

At each scrape the gateway asks every instance for its metrics port (GetInstanceInfo, so a
restarted instance's new port is found) and fetches http://<its gRPC host>:<port>/metrics, all
at once, each within SCRAPE_TIMEOUT_S. Each instance's samples come back labelled `tier` and
`instance` (the address the gateway routes to, as in /health), merged by name with the
gateway's own (`tier="gateway"`), and `tandem:instance_up{tier, instance}` says which answered.
Scrape the gateway with `honor_labels: true`, or Prometheus renames `instance` to
`exported_instance`.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from typing import TYPE_CHECKING, Callable, Iterable

import grpc
from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from engine.metrics import NUM_REQUESTS_RUNNING, NUM_REQUESTS_RUNNING_HELP, PREFIX, RequestMetrics
from gateway.routing import ROLE_NAMES, Instance
from protos.tandem.v1 import instance_pb2

if TYPE_CHECKING:
    from gateway.backend import Backend

logger = logging.getLogger("tandem.gateway")

SCRAPE_TIMEOUT_S = 2.0


class GatewayMetrics(RequestMetrics):
    """The gateway's own metrics: requests as its clients see them (RequestMetrics measured at
    the gateway), and `num_inflight()` as tandem:num_requests_running."""

    def __init__(self, num_inflight: Callable[[], int]) -> None:
        super().__init__("gateway")
        Gauge(NUM_REQUESTS_RUNNING, NUM_REQUESTS_RUNNING_HELP, ["tier"],
              registry=self.registry).labels(self.tier).set_function(num_inflight)
        self.decode_failures = self._counter(
            "decode_instance_failures", "Requests whose decode instance failed under them (the "
            "call ended UNAVAILABLE and the instance's health check failed): the instance left "
            "the routing until its health returned")
        self.requests_moved = self._counter(
            "requests_moved", "Requests opened again on another decode instance after theirs "
            "failed before sending anything")


def install_metrics(app: FastAPI, backend: Backend) -> None:
    """Adds GET /metrics to `app`: the Prometheus text of the gateway and of every instance."""

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(await render(backend), media_type=CONTENT_TYPE_LATEST)


async def render(backend: Backend) -> bytes:
    """The gateway's metrics and every instance's, scraped now, as Prometheus text."""
    instances = backend.registry.instances
    scraped = await asyncio.gather(*(scrape(i, SCRAPE_TIMEOUT_S) for i in instances))
    up = GaugeMetricFamily(PREFIX + "instance_up", "1 if the instance's /metrics answered this "
                           "scrape; 0 if it did not (down, unreachable, or started without "
                           "--metrics-port)", labels=["tier", "instance"])
    for instance, families in zip(instances, scraped, strict=True):
        up.add_metric([ROLE_NAMES[instance.role], instance.address], float(families is not None))
    # its own through the text too, so they have the instances' shape (`_created` series apart)
    own = text_string_to_metric_families(generate_latest(backend.metrics.registry).decode())
    merged = _merge([*own, up, *(f for families in scraped if families for f in families)])
    return generate_latest(_Families(merged))


async def scrape(instance: Instance, timeout_s: float) -> list[Metric] | None:
    """The instance's metric families, its samples labelled with its tier and address; None if
    it has no metrics port or did not answer within `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            info = await instance.instance_stub().GetInstanceInfo(
                instance_pb2.GetInstanceInfoRequest())
            if not info.metrics_port:
                return None
            host = instance.address.rsplit(":", 1)[0]
            url = f"http://{host}:{info.metrics_port}/metrics"
            text = await asyncio.to_thread(_http_get, url, timeout_s)
        families = list(text_string_to_metric_families(text))
    except (grpc.RpcError, OSError, TimeoutError, ValueError) as e:
        logger.debug("no metrics from %s: %s", instance.address, e)
        return None
    labels = {"tier": ROLE_NAMES[instance.role], "instance": instance.address}
    return [_relabelled(family, labels) for family in families]


def _http_get(url: str, timeout_s: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read().decode("utf-8")


def _relabelled(family: Metric, labels: dict[str, str]) -> Metric:
    """A copy of `family` whose samples carry `labels` (replacing labels of the same names)."""
    copy = Metric(family.name, family.documentation, family.type, family.unit)
    copy.samples = [s._replace(labels={**s.labels, **labels}) for s in family.samples]
    return copy


def _merge(families: Iterable[Metric]) -> list[Metric]:
    """One family per name (the text format allows no repeat), samples in arrival order. A
    family whose type disagrees with the first of its name (another Tandem version) is left
    out."""
    merged: dict[str, Metric] = {}
    for family in families:
        into = merged.get(family.name)
        if into is None:
            into = merged[family.name] = Metric(family.name, family.documentation, family.type,
                                                family.unit)
        if into.type != family.type:
            logger.warning("metric %s is a %s here and a %s elsewhere; left out", family.name,
                           into.type, family.type)
            continue
        into.samples.extend(family.samples)
    return list(merged.values())


class _Families:
    """Already collected families, in the shape `generate_latest` reads."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families
