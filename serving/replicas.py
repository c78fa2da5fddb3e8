"""Serving replicas: several vLLM-protocol servers behind one engine client.

A :class:`ReplicaSet` holds one HTTP client per replica (a ``vllm serve`` or an
``appliance serve-engine`` process on this host) and what the engine knows of
each: whether it answered last time, how many requests it is serving now, and
the last error. :meth:`ReplicaSet.pick` sends a request to the replica with the
fewest outstanding requests among those that are up, round-robin between equals.
A replica that failed is skipped until ``retry_down_s`` has passed (or the
reconciler found it answering again); when none is up, :class:`NoReplicaError`
says which replicas were tried and why they failed.

What each replica must have loaded is the engine's business
(:class:`~serving.vllm_engine.VllmEngine`): it loads and unloads adapters on
every replica and its ``reconcile()`` repairs the difference.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx

from serving.errors import NoReplicaError

__all__ = ["Replica", "ReplicaReport", "ReplicaSet", "parse_replica_map", "parse_replica_urls", "replicas_for"]


def parse_replica_urls(value: str | Sequence[str]) -> list[str]:
    """The replica URLs of ``"http://a:8000,http://b:8000"`` (or a list), without trailing slashes.

    Raises:
        ValueError: a URL is not http(s), or one is given twice, or none is given.
    """
    urls = [u.strip().rstrip("/") for u in (value.split(",") if isinstance(value, str) else value)]
    urls = [u for u in urls if u]
    if not urls:
        raise ValueError("expected one or more comma-separated URLs such as http://127.0.0.1:8000")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"expected http(s) URLs such as http://127.0.0.1:8000; got {url!r}")
    if len(set(urls)) != len(urls):
        raise ValueError(f"a replica is listed twice in {','.join(urls)!r}")
    return urls


def parse_replica_map(value: str) -> dict[str | None, list[str]]:
    """Base model name -> its replica URLs, from ``APPLIANCE_VLLM_URL``'s comma-separated entries.

    Each entry is ``URL`` or ``BASE_MODEL=URL``: ``"llama-8b=http://127.0.0.1:8000,qwen-7b=http://127.0.0.1:8001"``
    serves each base model through its own vLLM server (one vLLM server serves one base model). Plain
    URLs go under the key ``None`` and serve every LLM base model that no entry names.

    Raises:
        ValueError: a URL is not http(s), a URL is given twice, a name is empty, or no URL is given.
    """
    groups: dict[str | None, list[str]] = {}
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        name, sep, url = entry.partition("=")
        if not sep:
            name, url = "", entry
        elif not name.strip():
            raise ValueError(f"an entry {entry!r} names no base model before '='; write BASE_MODEL=URL or a URL")
        groups.setdefault(name.strip() or None, []).append(url)
    if not groups:
        raise ValueError("expected one or more comma-separated URLs such as http://127.0.0.1:8000")
    parsed = {name: parse_replica_urls(urls) for name, urls in groups.items()}
    every = [u for urls in parsed.values() for u in urls]
    if len(set(every)) != len(every):
        twice = sorted({u for u in every if every.count(u) > 1})
        raise ValueError(f"a replica is listed twice: {', '.join(twice)} (one vLLM server serves one base model)")
    return parsed


def replicas_for(value: str, base_model: str) -> list[str]:
    """The replica URLs serving ``base_model`` under ``APPLIANCE_VLLM_URL`` (its own, else the plain URLs).

    Raises:
        ValueError: the value does not parse, or names other base models only.
    """
    groups = parse_replica_map(value)
    urls = groups.get(base_model) or groups.get(None)
    if not urls:
        named = ", ".join(sorted(n for n in groups if n))
        raise ValueError(f"no vLLM server is set for base model {base_model!r} (servers are set for {named}); "
                         f"add {base_model}=URL")
    return urls


@dataclass(eq=False)
class Replica:
    """One serving process and what the client knows of it."""

    url: str
    http: httpx.Client = field(repr=False)
    up: bool = True
    outstanding: int = 0
    last_error: str | None = None
    failed_at: float = 0.0
    #: Requests sent to this replica since the engine started (for operators and tests).
    served: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"url": self.url, "up": self.up, "outstanding": self.outstanding, "served": self.served,
                "last_error": self.last_error}


@dataclass
class ReplicaReport:
    """What one reconciliation pass found and changed on one replica."""

    replica: str
    up: bool
    came_back: bool = False
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    #: Adapter (upstream name) -> why loading or unloading it failed; retried next pass.
    failed: dict[str, str] = field(default_factory=dict)
    #: Adapter (upstream name) -> why the replica refused to load it; not retried (the same adapter
    #: would be refused again), until it is published anew.
    refused: dict[str, str] = field(default_factory=dict)
    #: Why the replica cannot serve adapters at all (wrong api key, runtime updating off), if so.
    error: str | None = None

    @property
    def changed(self) -> bool:
        return bool(self.came_back or self.loaded or self.unloaded or self.failed)

    def to_dict(self) -> dict[str, object]:
        return {"replica": self.replica, "up": self.up, "came_back": self.came_back, "loaded": self.loaded,
                "unloaded": self.unloaded, "failed": self.failed, "refused": self.refused, "error": self.error}


class ReplicaSet:
    """The replicas of one engine, with least-outstanding balancing and failure tracking.

    Args:
        urls: Base URLs, e.g. ``["http://127.0.0.1:8000", "http://127.0.0.1:8001"]``.
        headers: Sent with every request (the bearer token of ``--api-key``).
        timeout_s: Read timeout for one request (a whole non-streamed generation).
        retry_down_s: How long a failed replica is skipped before a request may try it again.
        transport: For tests: an ``httpx`` transport shared by every replica.
    """

    def __init__(self, urls: Sequence[str], *, headers: dict[str, str] | None = None, timeout_s: float = 600.0,
                 retry_down_s: float = 5.0, transport: httpx.BaseTransport | None = None) -> None:
        self.replicas = [
            Replica(url, httpx.Client(base_url=url, headers=headers or {}, transport=transport,
                                      timeout=httpx.Timeout(timeout_s, connect=5.0)))
            for url in parse_replica_urls(list(urls))
        ]
        self.retry_down_s = retry_down_s
        self._lock = threading.Lock()
        self._turn = itertools.count()

    def __len__(self) -> int:
        return len(self.replicas)

    def candidates(self, exclude: Sequence[Replica] = ()) -> list[Replica]:
        """Replicas to try for one request, best first; empty once every one was tried.

        Replicas that are up come first (fewest outstanding requests first, taking turns between
        equals), then failed ones whose ``retry_down_s`` has passed. When every replica has
        failed recently, all are tried again rather than refusing outright.
        """
        now = time.monotonic()
        with self._lock:
            turn = next(self._turn)
            n = len(self.replicas)
            rotated = [r for r in (self.replicas[(turn + i) % n] for i in range(n)) if r not in exclude]
            usable = [r for r in rotated if r.up or now - r.failed_at >= self.retry_down_s]
            if not usable and not any(r.up for r in self.replicas):
                usable = rotated
            return sorted(usable, key=lambda r: (not r.up, r.outstanding))

    def reachable(self) -> list[Replica]:
        """Replicas to fan an adapter load or unload out to: those up, or all when none is."""
        with self._lock:
            up = [r for r in self.replicas if r.up]
            return up or list(self.replicas)

    def no_replica(self, tried: Sequence[Replica] = ()) -> NoReplicaError:
        """The error for a request no replica could take."""
        with self._lock:
            why = "; ".join(f"{r.url}: {r.last_error or 'busy'}" for r in self.replicas)
        what = "answered" if tried else "is up"
        return NoReplicaError(f"no serving replica {what} ({len(self.replicas)} configured: {why}); "
                              "check the vLLM servers in APPLIANCE_VLLM_URL", param="model")

    @contextmanager
    def using(self, replica: Replica) -> Iterator[Replica]:
        """Count a request as outstanding on ``replica`` while the block runs."""
        with self._lock:
            replica.outstanding += 1
            replica.served += 1
        try:
            yield replica
        finally:
            with self._lock:
                replica.outstanding -= 1

    def mark_down(self, replica: Replica, error: str) -> bool:
        """Record a failure; True if the replica was up until now."""
        with self._lock:
            was_up = replica.up
            replica.up, replica.last_error, replica.failed_at = False, error, time.monotonic()
            return was_up

    def mark_up(self, replica: Replica) -> bool:
        """Record a success; True if the replica was down until now."""
        with self._lock:
            was_down = not replica.up
            replica.up, replica.last_error = True, None
            return was_down

    def note_error(self, replica: Replica, error: str) -> None:
        """Record what is wrong with a replica that answers (it stays up: the base model still serves)."""
        with self._lock:
            replica.last_error = error

    def status(self) -> list[dict[str, object]]:
        with self._lock:
            return [r.to_dict() for r in self.replicas]

    def close(self) -> None:
        for r in self.replicas:
            r.http.close()
