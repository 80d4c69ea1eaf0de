"""Whether a Ray cluster can hold a job's stages, decided before the job starts.

A Ray Data job waits, without a word, for resources its cluster does not have: the replicas (actors)
start first and keep their CPUs (and GPUs) for the whole job, and every other stage needs CPUs beside
them on some node: Ray Data's file listing for folders, Parquet and WebDataset takes one whole CPU
(Ray 2.60 sets it and offers no option), the read and write tasks ``decode_cpus`` each. On a cluster of
2 CPUs, two one-CPU replicas and a Parquet input therefore wait forever.

So a job is planned against the cluster's nodes first: on a fixed cluster, more replicas than fit are
cut to the number that fits (with a warning naming what was changed), and a job of which not even one
replica fits fails at once, naming what is missing. A cluster that autoscales (as Ray Data sees it: a
node type that can grow) gets the job as asked, with a line saying what it waits for.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import ray

logger = logging.getLogger(__name__)

# Ray Data's file listing task (ListFiles, before the read tasks of folders, Parquet and WebDataset).
LISTING_CPUS = 1.0
_EPS = 1e-9  # Ray counts resources in units of 1e-4; sums of fractions must not lose a slot to rounding


class ClusterTooSmallError(RuntimeError):
    """A fixed Ray cluster cannot hold even one replica beside the job's other stages."""


@dataclass(frozen=True)
class StageNeeds:
    """What the job asks of the cluster: each replica's CPUs and GPUs, and the CPUs that must stay free
    on some node beside the replicas (the largest task of the other stages), with what needs them."""

    replica_cpus: float
    replica_gpus: int
    free_cpus: float
    free_for: str


def stage_needs(layout: str, replica_cpus: float, on_gpu: bool, decode_cpus: float) -> StageNeeds:
    if layout == "jsonl":  # the driver reads a task file: no listing task
        return StageNeeds(replica_cpus, int(on_gpu), decode_cpus,
                          f"the image decoding and shard writing tasks ({decode_cpus:g} CPU each)")
    return StageNeeds(replica_cpus, int(on_gpu), max(decode_cpus, LISTING_CPUS),
                      f"Ray Data's file listing ({LISTING_CPUS:g} CPU) and the read and write tasks "
                      f"({decode_cpus:g} CPU each)")


Node = Mapping[str, float]  # a node's total resources, as ray.nodes() gives them ("CPU", "GPU", ...)


def cluster_nodes() -> list[dict[str, float]]:
    """The total resources of each live node of the connected cluster."""
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def cluster_autoscales() -> bool:
    """Whether the cluster can add nodes: Ray Data's own test (it asks for scale-up only then)."""
    try:
        from ray.data._internal.cluster_autoscaler.util import is_autoscaling_enabled
    except ImportError:  # another Ray layout: plan as for a fixed cluster (cutting replicas never hangs)
        return False
    return bool(is_autoscaling_enabled())


def replicas_that_fit(nodes: Sequence[Node], needs: StageNeeds) -> int:
    """The most replicas the nodes hold while one node keeps ``needs.free_cpus`` CPUs for the other stages."""
    slots, give_up = [], []
    for node in nodes:
        cpus, gpus = node.get("CPU", 0.0), node.get("GPU", 0.0)
        fit = math.floor(cpus / needs.replica_cpus + _EPS) if needs.replica_cpus > 0 else math.inf
        if needs.replica_gpus:
            fit = min(fit, math.floor(gpus / needs.replica_gpus + _EPS))
        if fit == math.inf:  # replicas that take no CPU and no GPU: the job asks for as many as it likes
            fit = 1 << 30
        slots.append(fit)
        if cpus + _EPS >= needs.free_cpus:  # this node can be the one that keeps the CPUs free
            short = needs.free_cpus - (cpus - fit * needs.replica_cpus)
            give_up.append(0 if short <= _EPS else math.ceil(short / needs.replica_cpus - _EPS))
    return max(0, sum(slots) - min(give_up)) if give_up else 0


def missing_for_one_replica(nodes: Sequence[Node], needs: StageNeeds) -> str:
    """What the cluster lacks for one replica and the free CPUs beside it, on the nodes nearest to it:
    both on one node, or the replica on one and the free CPUs on another."""
    def short(have: float, need: float) -> float:
        return max(0.0, need - have)

    options = [(short(n.get("GPU", 0.0), needs.replica_gpus), short(n.get("CPU", 0.0), needs.replica_cpus
                                                                      + needs.free_cpus)) for n in nodes]
    options += [(short(a.get("GPU", 0.0), needs.replica_gpus),
                 short(a.get("CPU", 0.0), needs.replica_cpus) + short(b.get("CPU", 0.0), needs.free_cpus))
                for i, a in enumerate(nodes) for j, b in enumerate(nodes) if i != j]
    gpus, cpus = min(options, default=(needs.replica_gpus, needs.replica_cpus + needs.free_cpus))
    parts = []
    if cpus > _EPS:
        parts.append(f"{cpus:g} CPU")
    if gpus > _EPS:
        parts.append(f"{gpus:g} GPU")
    return " and ".join(parts)


def describe(nodes: Sequence[Node]) -> str:
    cpus = "+".join(f"{node.get('CPU', 0.0):g}" for node in nodes) or "0"
    gpus = "+".join(f"{node.get('GPU', 0.0):g}" for node in nodes) or "0"
    return f"{len(nodes)} node(s) with {cpus} CPUs and {gpus} GPUs"


def plan_replicas(asked: int, nodes: Sequence[Node], needs: StageNeeds, autoscales: bool) -> int:
    """The replicas to start: ``asked`` when they fit (or the cluster can grow), else as many as fit,
    with a warning; a ClusterTooSmallError when not one fits a fixed cluster."""
    fit = replicas_that_fit(nodes, needs)
    if asked <= fit:
        return asked
    replica = f"{needs.replica_cpus:g} CPU" + (f" and {needs.replica_gpus} GPU" if needs.replica_gpus else "")
    if autoscales:
        logger.warning("lion run --engine ray: %d replica(s) of %s each, with %g CPU free beside them for %s, do "
                       "not fit this cluster now (%s; %d replica(s) fit): the job waits for the autoscaler to "
                       "add nodes", asked, replica, needs.free_cpus, needs.free_for, describe(nodes), fit)
        return asked
    if fit == 0:
        raise ClusterTooSmallError(
            f"this Ray cluster ({describe(nodes)}, fixed) cannot run the job: a replica needs {replica} on a node, "
            f"and {needs.free_cpus:g} CPU must stay free on a node beside the replicas for {needs.free_for}; "
            f"missing: {missing_for_one_replica(nodes, needs)}. Start the cluster with more, or lower the "
            "replicas' CPUs (replica_cpus, --replica-cpus) or decode_cpus (--decode-cpus)")
    logger.warning("lion run --engine ray: %d replica(s) of %s each do not fit this fixed cluster (%s) with %g CPU "
                   "free beside them for %s; running %d replica(s) instead (a smaller --replica-cpus, which "
                   "leaves each replica's --threads as they are, fits more)", asked, replica, describe(nodes),
                   needs.free_cpus, needs.free_for, fit)
    return fit


class WaitReporter:
    """While a job waits for an autoscaling cluster to grow, a line every ``every_s`` seconds saying what
    it waits for, until the replicas fit (or ``stop()``)."""

    def __init__(self, replicas: int, needs: StageNeeds, every_s: float = 60.0) -> None:
        self._replicas, self._needs, self._every_s = replicas, needs, every_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lion-ray-wait", daemon=True)

    def start(self) -> WaitReporter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self._every_s):
            nodes = cluster_nodes()
            if replicas_that_fit(nodes, self._needs) >= self._replicas:
                logger.warning("lion run --engine ray: the cluster has grown to %s; the job's stages fit",
                               describe(nodes))
                return
            logger.warning("lion run --engine ray: still waiting for the cluster to grow: %d replica(s) need "
                           "room beside %g free CPU; it has %s", self._replicas, self._needs.free_cpus,
                           describe(nodes))
