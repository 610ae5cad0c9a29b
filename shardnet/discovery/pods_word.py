"""The pods' word on EndpointSlice endpoints: which endpoints a slice still lists whose pod is going or gone.

The EndpointSlice controller derives slices from pods, and lags them: a pod
being deleted, or deleted, stays in its slice for a while, and a head that
routed by the slices alone would keep sending requests to a draining pod, or to
whatever took its IP. The pods source says so first-hand, so an endpoint is not
routed once the pods source has said that the pod the endpoint names (its
``targetRef``) is being deleted, has ended (Failed, Succeeded) or was deleted.

Only such final words count: they are about that very pod, which never comes
back, so they stand while the pods source fails afterwards. The one way back is a
pod that left the pods' selector (a label edited: DELETED) and came back with
its uid: what its slice's latest word listed is put back then, and nothing the
ledger let go of meanwhile. Who holds an IP or a name now is not
final (it changes while the pods source cannot say so), and is left to the
ledger's newest-claim rule; a pod merely not ready is left to its slice, which
follows readiness soon enough. Only pods the pods source follows can veto: a
head follows its own deployment's, and a slice endpoint without a ``targetRef``
(a hand-made slice) names no pod.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable, Mapping, NamedTuple, Optional

_ENDED_PHASES = ("Succeeded", "Failed")  # an evicted pod is Failed
# deleted pods remembered, the latest last: a slice lagging behind a deletion may name one after it went
REMEMBERED_DELETIONS = 4096


class SliceEndpoint(NamedTuple):
    """One endpoint of a slice, as routed by the slice alone, and the uid of the pod it names (its targetRef)."""

    member: Any  # discovery.kubernetes.Member: (deployment, head, shard_id, address)
    pod_uid: Optional[str]


class PodsWord:
    """Which pods the pods source said are going or gone, the endpoints each slice lists, and which of those
    endpoints are vetoed.

    The pool hands it every pod and slice it receives; ``routed(key)`` is what
    a slice contributes once vetoed, and ``slices_naming`` tells which slices
    a pod's news may change.
    """

    def __init__(self) -> None:
        self._going: dict[str, str] = {}  # uid -> name, of followed pods being deleted or ended
        # uid -> name, of every followed pod the pods source shows now (ready or not, holding an address or not): a
        # relist without one says it was deleted meanwhile, whether or not the ledger held a member of it
        self._present: dict[str, str] = {}
        self._deleted: OrderedDict[str, str] = OrderedDict()  # uid -> name, of the pods seen deleted, latest last
        self._slices: dict[str, tuple[SliceEndpoint, ...]] = {}  # slice key -> its endpoints
        self._naming: dict[str, set[str]] = {}  # a pod uid -> the slice keys naming it
        self._given: dict[str, frozenset] = {}  # slice key -> what it was last said to contribute
        # slice key -> the members its own latest word listed that a veto kept out then: they are the ones put back
        # if that veto lifts (withdrawn ones are not: the ledger may have let go of them meanwhile)
        self._held_back: dict[str, frozenset] = {}
        self._vetoed: set[tuple[str, SliceEndpoint]] = set()  # (slice key, endpoint) vetoes said already

    # -- the pods' news -------------------------------------------------------------

    def pod_seen(self, pod: Mapping[str, Any]) -> set[str]:
        """Note a pod as added or modified; the uids whose word changed. A pod that cannot be read is left out
        (the pool says it is malformed)."""
        read = _read_pod(pod)
        return set() if read is None else self._note(*read)

    def pod_deleted(self, pod: Mapping[str, Any]) -> set[str]:
        """Note a pod as deleted; the uids whose word changed."""
        read = _read_pod(pod)
        return set() if read is None else self._gone(read[0], read[1])

    def pods_listed(self, pods: Iterable[Mapping[str, Any]], known_before: Iterable[str]) -> set[str]:
        """Take a (re-)list as the whole word: a pod of ``known_before`` (the uids the pool held) that is not
        listed now was deleted meanwhile."""
        listed = {read[0]: read for pod in pods if (read := _read_pod(pod)) is not None}
        touched: set[str] = set()
        for uid in set(known_before) | set(self._present):  # a pod being deleted is present until it is gone
            if uid not in listed:
                touched |= self._gone(uid, self._present.get(uid, uid))
        for read in listed.values():
            touched |= self._note(*read)
        return touched

    def _note(self, uid: str, name: str, going: bool) -> set[str]:
        """One pod's word; ``{uid}`` when it may change a veto."""
        # out of the selector and back (a label edited): DELETED, then ADDED again, its deletion no longer true
        touched = {uid} if self._deleted.pop(uid, None) is not None else set()
        self._present[uid] = name
        if going:
            self._going[uid] = name
            return {uid}
        self._going.pop(uid, None)
        return touched

    def _gone(self, uid: str, name: str) -> set[str]:
        self._going.pop(uid, None)
        self._present.pop(uid, None)
        self._deleted[uid] = name
        self._deleted.move_to_end(uid)
        while len(self._deleted) > REMEMBERED_DELETIONS:
            self._deleted.popitem(last=False)
        return {uid}

    # -- the slices' word -----------------------------------------------------------

    def slices_listed(self, listed: Mapping[str, Iterable[SliceEndpoint]]) -> None:
        """Take a (re-)list of the slices as the whole word: those not listed now are gone."""
        for key in [key for key in self._slices if key not in listed]:
            self.slice_gone(key)
        for key, endpoints in listed.items():
            self.slice_seen(key, endpoints)

    def slice_seen(self, key: str, endpoints: Iterable[SliceEndpoint]) -> None:
        """Note what slice ``key`` lists now (``routed`` says what it contributes)."""
        self._unindex(key)
        self._slices[key] = tuple(endpoints)
        for endpoint in self._slices[key]:
            if endpoint.pod_uid is not None:
                self._naming.setdefault(endpoint.pod_uid, set()).add(key)
        self._vetoed = {said for said in self._vetoed if said[0] != key or said[1] in self._slices[key]}

    def slice_gone(self, key: str) -> None:
        self._unindex(key)
        self._vetoed = {said for said in self._vetoed if said[0] != key}

    def _unindex(self, key: str) -> None:
        for endpoint in self._slices.pop(key, ()):
            keys = self._naming.get(endpoint.pod_uid) if endpoint.pod_uid is not None else None
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._naming[endpoint.pod_uid]
        self._given.pop(key, None)
        self._held_back.pop(key, None)

    def listed(self, key: str) -> frozenset:
        """The members slice ``key`` lists now, vetoed or not."""
        return frozenset(endpoint.member for endpoint in self._slices.get(key, ()))

    def slices_naming(self, uids: Iterable[str]) -> list[str]:
        """The slices with an endpoint naming one of the pods ``uids``."""
        return sorted({key for uid in uids for key in self._naming.get(uid, ())})

    def routed(self, key: str) -> frozenset:
        """What slice ``key`` contributes now, vetoes applied, noted as said: to be recorded at once, as the
        slice's own word (what a veto keeps out of it is held back, to be put back if the veto lifts)."""
        self._given[key] = self._allowed(key)
        self._held_back[key] = frozenset(e.member for e in self._slices.get(key, ())) - self._given[key]
        return self._given[key]

    def changed(self, key: str) -> tuple[frozenset, frozenset]:
        """(members of slice ``key`` vetoed since it was last said what it contributes, to be taken out of what it
        contributes as recorded; members its own latest word listed that a veto held back and that veto lifted,
        a pod back in the selector, to be put back), noted as said now: to be recorded at once."""
        if key not in self._slices:
            return frozenset(), frozenset()
        before, held = self._given.get(key, frozenset()), self._held_back.get(key, frozenset())
        allowed = self._allowed(key)
        withdrawn, restored = before - allowed, held & allowed
        self._given[key] = (before & allowed) | restored
        self._held_back[key] = held - restored
        return withdrawn, restored

    def _allowed(self, key: str) -> frozenset:
        """The members of slice ``key`` no veto keeps out."""
        return frozenset(e.member for e in self._slices.get(key, ()) if self.veto(e) is None)

    def newly_said(self, keys: Iterable[str]) -> list[tuple[SliceEndpoint, str]]:
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
        if uid is None:
            return None
        if uid in self._deleted:
            return f"its pod {self._deleted[uid]} was deleted"
        if uid in self._going:
            return f"its pod {self._going[uid]} is being deleted or has ended"
        return None


def _read_pod(pod: Mapping[str, Any]) -> Optional[tuple[str, str, bool]]:
    """(uid, name, going: being deleted or ended) of a pod, or None when it has no uid or cannot be read."""
    try:
        metadata = pod.get("metadata") or {}
        uid = metadata.get("uid")
        if not uid:
            return None
        status = pod.get("status") or {}
        going = bool(metadata.get("deletionTimestamp")) or status.get("phase") in _ENDED_PHASES
        return str(uid), str(metadata.get("name") or uid), going
    except (AttributeError, TypeError, ValueError):  # a field of another type: the pool logs it as malformed
        return None
