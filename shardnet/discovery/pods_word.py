"""The pods' word on EndpointSlice endpoints: which endpoints a slice still lists that its pod no longer stands for.

The EndpointSlice controller derives slices from pods, and lags them: a pod
being deleted, or deleted and its IP given to a pod of another shard or
deployment, stays in its slice for a while, and a head that routed by the
slices alone would send requests to a draining pod or to the wrong shard. The
pods source says these things first-hand, so an endpoint is not routed once the
pods source has said that the pod the endpoint names (its ``targetRef``) is
being deleted, has ended or was deleted, or that the endpoint's IP is now
another pod's. Each of those is final (a deletion is never undone, and a pod
keeps its IP for life), so a veto stands while the pods source fails
afterwards; a pod that is merely not ready vetoes nothing, since readiness
comes back and the slice follows it soon enough.

Only what the pods source follows can be vetoed: a head follows its own
deployment's pods, so a pod of another deployment that took over an IP is not
seen; an endpoint with no ``targetRef`` (a hand-made slice) is vetoed only by
a followed pod of another role at its IP.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

Role = tuple[str, bool, Optional[int]]  # (deployment, head, shard id): what a replica serves

_ENDED_PHASES = ("Succeeded", "Failed")  # an evicted pod is Failed, and keeps its IP in its status


class SliceEndpoint(NamedTuple):
    """One endpoint of a slice, as routed by the slice alone, and the pod it names (its targetRef's uid)."""

    member: Any  # discovery.kubernetes.Member: (deployment, head, shard_id, address)
    ip: str
    pod_uid: Optional[str]


class _Pod(NamedTuple):
    name: str
    ips: frozenset[str]  # the IPs only this pod holds (not a host network's, which many pods share)
    role: Optional[Role]  # what it serves, as the pods source reads it
    ending: bool  # being deleted, or its containers are done for good


class PodsWord:
    """What the pods source last said of each pod it follows, the endpoints each slice lists, and which of
    those endpoints the pods contradict.

    The pool hands it every pod and slice it receives; ``routed(key)`` is what
    a slice contributes once vetoed, and ``slices_naming`` tells which slices
    a pod's news may change.
    """

    def __init__(self) -> None:
        self._pods: dict[str, _Pod] = {}  # uid -> its latest word
        self._at: dict[str, str] = {}  # IP -> the uid of the followed pod holding it
        self._deleted: dict[str, str] = {}  # uid -> name, of pods deleted that a slice still names
        self._slices: dict[str, tuple[SliceEndpoint, ...]] = {}  # slice key -> its endpoints
        self._naming: dict[str, set[str]] = {}  # a pod uid or an IP -> the slice keys naming it
        self._given: dict[str, frozenset] = {}  # slice key -> what it was last said to contribute
        self._vetoed: set[tuple[str, SliceEndpoint]] = set()  # (slice key, endpoint) vetoes said already

    # -- the pods' news -------------------------------------------------------------

    def pod_seen(self, pod: Mapping[str, Any], role: Optional[Role]) -> set[str]:
        """Note a pod as added or modified; the uids and IPs whose word changed."""
        uid = _uid(pod)
        if uid is None:
            return set()
        touched = self._forget(uid)
        metadata, status = pod.get("metadata") or {}, pod.get("status") or {}
        ending = bool(metadata.get("deletionTimestamp")) or status.get("phase") in _ENDED_PHASES
        ips = frozenset() if (pod.get("spec") or {}).get("hostNetwork") else _ips(status)
        self._pods[uid] = _Pod(str(metadata.get("name") or uid), ips, role, ending)
        for ip in ips if not ending else ():  # an ended pod's IP may be another's already
            self._at[ip] = uid
        return touched | ips | {uid}

    def pod_deleted(self, pod: Mapping[str, Any]) -> set[str]:
        """Note a pod as deleted; the uids and IPs whose word changed."""
        uid = _uid(pod)
        if uid is None:
            return set()
        touched = self._forget(uid)
        if uid in self._naming:  # a slice still names it: keep its death in mind while one does
            self._deleted[uid] = str((pod.get("metadata") or {}).get("name") or uid)
        return touched | {uid}

    def pods_listed(
        self, pods: Iterable[Mapping[str, Any]], role_of_pod: Callable[[Mapping[str, Any]], Optional[Role]]
    ) -> set[str]:
        """Take a (re-)list as the whole word: a pod known before and not listed now was deleted meanwhile."""
        listed = {uid: pod for pod in pods if (uid := _uid(pod)) is not None}
        touched: set[str] = set()
        for uid in [uid for uid in self._pods if uid not in listed]:
            touched |= self.pod_deleted({"metadata": {"uid": uid, "name": self._pods[uid].name}})
        for pod in listed.values():
            touched |= self.pod_seen(pod, role_of_pod(pod))
        return touched

    def _forget(self, uid: str) -> set[str]:
        old = self._pods.pop(uid, None)
        if old is None:
            return set()
        for ip in old.ips:
            if self._at.get(ip) == uid:
                del self._at[ip]
        return set(old.ips)

    # -- the slices' word -----------------------------------------------------------

    def slice_seen(self, key: str, endpoints: Iterable[SliceEndpoint]) -> frozenset:
        """Note what slice ``key`` lists now; what it contributes, vetoes applied."""
        before = self._unindex(key)
        self._slices[key] = tuple(endpoints)
        for endpoint in self._slices[key]:
            for ref in (endpoint.ip, endpoint.pod_uid):
                if ref is not None:
                    self._naming.setdefault(ref, set()).add(key)
        self._forget_deaths(before)
        self._vetoed = {said for said in self._vetoed if said[0] != key or said[1] in self._slices[key]}
        self._given[key] = self._routed(key)
        return self._given[key]

    def slice_gone(self, key: str) -> None:
        self._forget_deaths(self._unindex(key))
        self._vetoed = {said for said in self._vetoed if said[0] != key}

    def slice_keys(self) -> list[str]:
        return list(self._slices)

    def _unindex(self, key: str) -> set[str]:
        """Take slice ``key`` out of the index; the refs it named."""
        named = set()
        for endpoint in self._slices.pop(key, ()):
            for ref in (endpoint.ip, endpoint.pod_uid):
                keys = self._naming.get(ref) if ref is not None else None
                if keys is not None:
                    named.add(ref)
                    keys.discard(key)
                    if not keys:
                        del self._naming[ref]
        self._given.pop(key, None)
        return named

    def _forget_deaths(self, refs: set[str]) -> None:
        """A deleted pod no slice names any more is forgotten: nothing is left for its death to veto."""
        for ref in refs - self._naming.keys():
            self._deleted.pop(ref, None)

    def slices_naming(self, refs: Iterable[str]) -> list[str]:
        """The slices with an endpoint at one of ``refs`` (IPs) or naming one of them (pod uids)."""
        return sorted({key for ref in refs for key in self._naming.get(ref, ())})

    def changed(self, key: str) -> Optional[frozenset]:
        """What slice ``key`` contributes now, when the pods' news changed it since it was last said; else None."""
        if key not in self._slices:
            return None
        routed = self._routed(key)
        if routed == self._given.get(key):
            return None
        self._given[key] = routed
        return routed

    def newly_vetoed(self, keys: Iterable[str]) -> list[tuple[SliceEndpoint, str]]:
        """The endpoints of slices ``keys`` vetoed since they were last looked at, each with why: said once."""
        news = []
        for key in keys:
            for endpoint in self._slices.get(key, ()):
                why = self.veto(endpoint)
                if why is None:
                    self._vetoed.discard((key, endpoint))
                elif (key, endpoint) not in self._vetoed:
                    self._vetoed.add((key, endpoint))
                    news.append((endpoint, why))
        return news

    def _routed(self, key: str) -> frozenset:
        return frozenset(e.member for e in self._slices.get(key, ()) if self.veto(e) is None)

    def veto(self, endpoint: SliceEndpoint) -> Optional[str]:
        """Why the pods say ``endpoint`` is not to be routed, or None."""
        uid = endpoint.pod_uid
        if uid is not None and uid in self._deleted:
            return f"its pod {self._deleted[uid]} was deleted"
        pod = self._pods.get(uid) if uid is not None else None
        if pod is not None and pod.ending:
            return f"its pod {pod.name} is being deleted or has ended"
        holder = self._at.get(endpoint.ip)
        if holder is None or holder == uid:
            return None
        other = self._pods[holder]
        if uid is not None:
            return f"its IP is pod {other.name}'s now"
        if other.role is not None and other.role != tuple(endpoint.member[:3]):
            return f"its IP is pod {other.name}'s, which serves {_said(other.role)}"
        return None


def _uid(pod: Mapping[str, Any]) -> Optional[str]:
    uid = (pod.get("metadata") or {}).get("uid")
    return str(uid) if uid else None


def _ips(status: Mapping[str, Any]) -> frozenset[str]:
    """A pod's IPs: every family's (``podIPs``), and ``podIP``."""
    ips = {str(entry.get("ip")) for entry in status.get("podIPs") or [] if isinstance(entry, Mapping) and entry.get("ip")}
    if status.get("podIP"):
        ips.add(str(status["podIP"]))
    return frozenset(ips)


def _said(role: Role) -> str:
    deployment, head, shard = role
    return f"{deployment!r}'s head" if head else f"shard {shard} of {deployment!r}"

