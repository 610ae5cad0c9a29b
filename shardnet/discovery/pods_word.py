"""The pods' word on EndpointSlice endpoints: which endpoints a slice still lists that its pod no longer stands for.

The EndpointSlice controller derives slices from pods, and lags them: a pod
being deleted, or deleted and its IP given to a pod of another shard or
deployment, stays in its slice for a while, and a head that routed by the
slices alone would send requests to a draining pod or to the wrong shard. The
pods source says these things first-hand, so an endpoint is not routed once the
pods source has said of the pod the endpoint names (its ``targetRef``):

- that it is being deleted, has ended (Failed, Succeeded) or was deleted. These
  are final, about that very pod: they stand while the pods source fails later;
- that its name is another pod's now (a StatefulSet's pod made again), or its
  IP is (reused). These say who holds a name or an IP, which changes while
  the pods source cannot say so: they count only while it answers.

A pod merely not ready vetoes nothing: readiness comes back, and the slice
follows it soon enough. Only what the pods source follows can be vetoed: a head
follows its own deployment's pods, so a pod of another deployment that took
over an IP is not seen; an endpoint with no ``targetRef`` (a hand-made slice)
is vetoed only by a followed pod of another role at its IP.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

Role = tuple[str, bool, Optional[int]]  # (deployment, head, shard id): what a replica serves

_ENDED_PHASES = ("Succeeded", "Failed")  # an evicted pod is Failed, and keeps its IP in its status
# deleted pods remembered, most recent first: a slice lagging behind a deletion may name one after it went
REMEMBERED_DELETIONS = 4096


class SliceEndpoint(NamedTuple):
    """One endpoint of a slice, as routed by the slice alone, and the pod it names (its targetRef)."""

    member: Any  # discovery.kubernetes.Member: (deployment, head, shard_id, address)
    ip: str
    pod_uid: Optional[str]
    pod_name: Optional[str] = None  # namespace/name


class _Pod(NamedTuple):
    name: str  # namespace/name
    ips: frozenset[str]  # the IPs only this pod holds (not a host network's, which many pods share)
    role: Optional[Role]  # what it serves, as the pods source reads it
    ending: bool  # being deleted, or its containers are done for good


class PodsWord:
    """What the pods source last said of each pod it follows, the endpoints each slice lists, and which of
    those endpoints the pods contradict.

    The pool hands it every pod and slice it receives; ``routed(key)`` is what
    a slice contributes once vetoed, and ``slices_naming`` tells which slices
    a pod's news may change. ``answering`` says whether the pods source is
    listed and answering now: the words that can change behind its back count
    only then.
    """

    def __init__(self, answering: Callable[[], bool]) -> None:
        self._answering = answering
        self._pods: dict[str, _Pod] = {}  # uid -> its latest word
        self._at: dict[str, str] = {}  # IP -> the uid of the followed pod holding it
        self._named: dict[str, str] = {}  # namespace/name -> the uid of the followed pod of that name
        self._deleted: OrderedDict[str, str] = OrderedDict()  # uid -> name, of the pods seen deleted, latest last
        self._slices: dict[str, tuple[SliceEndpoint, ...]] = {}  # slice key -> its endpoints
        self._naming: dict[str, set[str]] = {}  # a pod uid or an IP -> the slice keys naming it
        self._given: dict[str, frozenset] = {}  # slice key -> what it was last said to contribute
        self._vetoed: set[tuple[str, SliceEndpoint]] = set()  # (slice key, endpoint) vetoes said already

    # -- the pods' news -------------------------------------------------------------

    def pod_seen(self, pod: Mapping[str, Any], role: Optional[Role]) -> set[str]:
        """Note a pod as added or modified; the uids and IPs whose word changed. A pod that cannot be read is
        left out (the pool says it is malformed)."""
        read = _read_pod(pod)
        if read is None:
            return set()
        uid, name, ips, ending = read
        touched = self._forget(uid)
        self._pods[uid] = _Pod(name, ips, role, ending)
        self._named[name] = uid
        for ip in ips if not ending else ():  # an ended pod's IP may be another's already
            self._at[ip] = uid
        return touched | ips | {uid}

    def pod_deleted(self, pod: Mapping[str, Any]) -> set[str]:
        """Note a pod as deleted; the uids and IPs whose word changed."""
        read = _read_pod(pod)
        if read is None:
            return set()
        return self._gone(read[0], read[1])

    def _gone(self, uid: str, name: str) -> set[str]:
        touched = self._forget(uid)
        self._deleted[uid] = name
        self._deleted.move_to_end(uid)
        while len(self._deleted) > REMEMBERED_DELETIONS:
            self._deleted.popitem(last=False)
        return touched | {uid}

    def pods_listed(
        self, pods: Iterable[Mapping[str, Any]], role_of_pod: Callable[[Mapping[str, Any]], Optional[Role]]
    ) -> set[str]:
        """Take a (re-)list as the whole word: a pod known before and not listed now was deleted meanwhile."""
        listed = {read[0]: pod for pod in pods if (read := _read_pod(pod)) is not None}
        touched: set[str] = set()
        for uid in [uid for uid in self._pods if uid not in listed]:
            touched |= self._gone(uid, self._pods[uid].name)
        for pod in listed.values():
            touched |= self.pod_seen(pod, role_of_pod(pod))
        return touched | set(self._naming)  # the IP and name words count again once the pods answer again

    def _forget(self, uid: str) -> set[str]:
        old = self._pods.pop(uid, None)
        if old is None:
            return set()
        for ip in old.ips:
            if self._at.get(ip) == uid:
                del self._at[ip]
        if self._named.get(old.name) == uid:
            del self._named[old.name]
        return set(old.ips)

    # -- the slices' word -----------------------------------------------------------

    def slice_seen(self, key: str, endpoints: Iterable[SliceEndpoint]) -> None:
        """Note what slice ``key`` lists now (``routed`` says what it contributes)."""
        self._unindex(key)
        self._slices[key] = tuple(endpoints)
        for endpoint in self._slices[key]:
            for ref in (endpoint.ip, endpoint.pod_uid):
                if ref is not None:
                    self._naming.setdefault(ref, set()).add(key)
        self._vetoed = {said for said in self._vetoed if said[0] != key or said[1] in self._slices[key]}

    def slice_gone(self, key: str) -> None:
        self._unindex(key)
        self._vetoed = {said for said in self._vetoed if said[0] != key}

    def slice_keys(self) -> list[str]:
        return list(self._slices)

    def _unindex(self, key: str) -> None:
        for endpoint in self._slices.pop(key, ()):
            for ref in (endpoint.ip, endpoint.pod_uid):
                keys = self._naming.get(ref) if ref is not None else None
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self._naming[ref]
        self._given.pop(key, None)

    def slices_naming(self, refs: Iterable[str]) -> list[str]:
        """The slices with an endpoint at one of ``refs`` (IPs) or naming one of them (pod uids)."""
        return sorted({key for ref in refs for key in self._naming.get(ref, ())})

    def routed(self, key: str) -> frozenset:
        """What slice ``key`` contributes now, vetoes applied, noted as said: to be recorded at once."""
        self._given[key] = frozenset(e.member for e in self._slices.get(key, ()) if self.veto(e) is None)
        return self._given[key]

    def changed(self, key: str) -> Optional[tuple[frozenset, frozenset]]:
        """(what slice ``key`` was last said to contribute, what it contributes now) when the pods' news changed
        it since; else None. Noted as said: to be recorded at once."""
        if key not in self._slices:
            return None
        before = self._given.get(key, frozenset())
        now = self.routed(key)
        return None if now == before else (before, now)

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

    def veto(self, endpoint: SliceEndpoint) -> Optional[str]:
        """Why the pods say ``endpoint`` is not to be routed, or None."""
        uid = endpoint.pod_uid
        if uid is not None and uid in self._deleted:
            return f"its pod {self._deleted[uid]} was deleted"
        pod = self._pods.get(uid) if uid is not None else None
        if pod is not None and pod.ending:
            return f"its pod {pod.name} is being deleted or has ended"
        if not self._answering():  # who holds a name or an IP changes while the pods cannot say so
            return None
        named = self._named.get(endpoint.pod_name) if endpoint.pod_name is not None and uid is not None else None
        if named is not None and named != uid:
            return f"its pod {endpoint.pod_name} was made again since (another uid)"
        holder = self._at.get(endpoint.ip)
        if holder is None or holder == uid:
            return None
        other = self._pods[holder]
        if uid is not None:
            return f"its IP is pod {other.name}'s now"
        if other.role is not None and other.role != tuple(endpoint.member[:3]):
            return f"its IP is pod {other.name}'s, which serves {_said(other.role)}"
        return None


def _read_pod(pod: Mapping[str, Any]) -> Optional[tuple[str, str, frozenset[str], bool]]:
    """(uid, namespace/name, its own IPs, ending) of a pod, or None when it has no uid or cannot be read."""
    try:
        metadata = pod.get("metadata") or {}
        uid = metadata.get("uid")
        if not uid:
            return None
        status, spec = pod.get("status") or {}, pod.get("spec") or {}
        name = f"{metadata.get('namespace') or ''}/{metadata.get('name') or uid}"
        ending = bool(metadata.get("deletionTimestamp")) or status.get("phase") in _ENDED_PHASES
        return str(uid), name, frozenset() if spec.get("hostNetwork") else _ips(status), ending
    except (AttributeError, TypeError, ValueError):  # a field of another type: the pool logs it as malformed
        return None


def _ips(status: Mapping[str, Any]) -> frozenset[str]:
    """A pod's IPs: every family's (``podIPs``), and ``podIP``."""
    ips = {str(entry.get("ip")) for entry in status.get("podIPs") or [] if isinstance(entry, Mapping) and entry.get("ip")}
    if status.get("podIP"):
        ips.add(str(status["podIP"]))
    return frozenset(ips)


def _said(role: Role) -> str:
    deployment, head, shard = role
    return f"{deployment!r}'s head" if head else f"shard {shard} of {deployment!r}"
