"""What the sparse arrays of one received message may expand to, together: a few bytes of shape must not make a
worker allocate gigabytes. Apart from ``ndarray`` so that reading requests needs no numpy until a tensor is read."""

from __future__ import annotations

import weakref
from typing import Optional

from shardnet.errors import ProtocolError
from shardnet.protocol.proto import docarray_pb2

# the largest array a sparse one may expand to: what a default-sized gRPC message could carry densely
# (a few bytes of shape must not allocate gigabytes)
MAX_DENSE_BYTES = 256 * 2**20
# ... and what all the sparse arrays of one received request may expand to together, each counted once however
# often it is read: 64 times the request's size, and MAX_DENSE_BYTES at least. Each array alone was bounded, so
# 12 of them in 796 bytes made a worker allocate 3 GB. A sparse embedding of 100 values in 100,000 float32
# dimensions is 2 KB on the wire and 400 KB dense (200 times): one request carries 640 of them.
DENSE_PER_MESSAGE_BYTE = 64
VIEWS_COMPACTED_AT = 4096  # weak references to Documents a budget notes before dropping the dead ones


class DenseBudget:
    """What the sparse arrays of one message may still expand to, shared by every view of its documents.

    ``limit`` None: unbounded (documents a program built itself). An array is charged once, by identity
    (protobuf hands back the same message object for the same array while one is held, and the budget holds
    it), so reading an embedding twice costs nothing more; refused past the limit (ProtocolError).
    """

    __slots__ = ("_absorbed", "_charged", "_compact_at", "_views", "limit", "size", "used")

    def __init__(self, limit: Optional[int], size: Optional[int] = None):
        self.limit, self.size, self.used = limit, size, 0  # size: of the message it is for, when received
        self._charged: Optional[dict[int, docarray_pb2.NdArrayProto]] = None  # made at the first charge
        self._absorbed: Optional[dict[int, DenseBudget]] = None
        # the Documents viewing this message's documents, while a worker's handler runs (track_views): detached
        # when it is done, so one an Executor keeps does not keep the whole request alive
        # (a weak reference to a view, the document it viewed then): one viewing another since (appended to the
        # Executor's own Document, or to another request's list) is not this message's to detach
        self._views: Optional[list[tuple[weakref.ref, object]]] = None
        self._compact_at = VIEWS_COMPACTED_AT

    def track_views(self) -> None:
        """Note every Document made from now on to view this message's documents (see ``detach_views``)."""
        if self._views is None:
            self._views = []

    def hold(self, view: object) -> None:
        """Note ``view`` (tracking is on: ``_views`` not None). Weak references, in a list (a Document is not
        hashable; a WeakSet's callbacks made a view 3 times dearer to make): the dead ones are dropped once the
        list doubled, so a handler iterating its documents again and again holds only those still alive."""
        views = self._views
        views.append((weakref.ref(view), view._pb))
        if len(views) > self._compact_at:
            views[:] = [held for held in views if held[0]() is not None]
            self._compact_at = max(VIEWS_COMPACTED_AT, 2 * len(views))

    def detach_views(self) -> None:
        """Give every Document still viewing this message's documents a copy of its own, and stop tracking. A view
        keeps the whole message alive (protobuf frees a message's parts together): an Executor keeping one
        document of each request (``self._kept.append(docs[0])``) held every request it was given, all of it."""
        views, self._views = self._views, None
        self._compact_at = VIEWS_COMPACTED_AT
        for ref, viewed in views or ():
            view = ref()
            if view is not None and view._pb is viewed:  # still viewing this message's document
                view._detach()

    @classmethod
    def for_message(cls, size: int) -> "DenseBudget":
        """The budget of a message of ``size`` bytes received from elsewhere."""
        return cls(max(MAX_DENSE_BYTES, DENSE_PER_MESSAGE_BYTE * size), size)

    def charge(self, source: docarray_pb2.NdArrayProto, dense_bytes: int, shape: tuple[int, ...]) -> None:
        if self.limit is None:
            return
        charged = self._charged if self._charged is not None else {}
        if id(source) in charged:
            return
        if self.used + dense_bytes > self.limit:
            whose = (
                f"a request of {self.size} bytes ({DENSE_PER_MESSAGE_BYTE} times its size, {MAX_DENSE_BYTES} at least)"
                if self.size is not None
                else "documents read outside a request"
            )
            raise ProtocolError(
                f"sparse NdArray of shape {shape} would expand to {dense_bytes} bytes, past what the sparse arrays "
                f"of {whose} may expand to in all: {self.limit} bytes, {self.used} taken already"
            )
        self.used += dense_bytes
        charged[id(source)] = source  # held: its id stays its own while it is charged
        self._charged = charged

    def absorb(self, other: Optional["DenseBudget"]) -> None:
        """Add ``other``'s limit to this one, once: documents of another message moved into this one's list
        (a worker joining the answers of several shards) bring what they may expand to along."""
        if other is None or other is self or other.limit is None or self.limit is None:
            return
        absorbed = self._absorbed if self._absorbed is not None else {}
        if id(other) not in absorbed:
            absorbed[id(other)] = other  # held: its id stays its own
            self._absorbed = absorbed
            self.limit += other.limit
