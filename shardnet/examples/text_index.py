"""``TextIndexer``: a sharded text index that searches by token overlap.

``/index`` stores documents in the shard's file in the workspace, so the
replicas of a shard that share a workspace (as ``shardnet deploy`` and the
demo run them; not pods with an ``emptyDir`` each) see what any of them
indexed; ``/search`` scores each
stored document by the Jaccard overlap of its tokens with the query's and
returns the ``top_k`` best as matches. Run ``/index`` with ANY polling (each
document lands in one shard) and ``/search`` with ALL (every shard answers,
the head merges the matches).
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

from shardnet.protocol.documents import Document, DocumentList
from shardnet.runtimes.executor import Executor, requests

_TOKEN = re.compile(r"\w+")


def tokens(text: str) -> frozenset[str]:
    return frozenset(token.lower() for token in _TOKEN.findall(text))


class TextIndexer(Executor):
    """Index text documents per shard; search them by token overlap."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        # the shard's own folder, shared by its replicas (an Executor made directly: the cache folder's), never
        # the current one
        self._path = Path(self.workspace) / f"text-index-shard-{self.runtime_args.shard_id}.jsonl"
        self._lock = threading.Lock()
        self._loaded_size = 0
        self._entries: list[tuple[str, str, frozenset[str]]] = []

    def _refresh(self) -> None:
        """Read what this shard's replicas appended since the last look."""
        if not self._path.exists() or self._path.stat().st_size == self._loaded_size:
            return
        with open(self._path, "rb") as handle:
            handle.seek(self._loaded_size)
            chunk = handle.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        for line in complete.splitlines():
            record = json.loads(line)
            self._entries.append((record["id"], record["text"], tokens(record["text"])))
        self._loaded_size += len(complete)

    @requests(on="/index")
    def index(self, docs: DocumentList, parameters: dict, **kwargs: Any) -> None:
        lines = b"".join(json.dumps({"id": doc.id, "text": doc.text}).encode() + b"\n" for doc in docs)
        with self._lock:
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, lines)  # one append: replicas of the shard never interleave a line
            finally:
                os.close(fd)
        for doc in docs:
            doc.tags["shard"] = self.runtime_args.shard_id

    @requests(on="/search")
    def search(self, docs: DocumentList, parameters: dict, **kwargs: Any) -> None:
        top_k = int(parameters.get("top_k", 3))
        with self._lock:
            self._refresh()
            entries = list(self._entries)
        for query in docs:
            wanted = tokens(query.text)
            scored = []
            for doc_id, text, have in entries:
                overlap = len(wanted & have) / len(wanted | have) if wanted | have else 0.0
                if overlap > 0:
                    scored.append((overlap, doc_id, text))
            scored.sort(key=lambda item: (-item[0], item[1]))
            for score, doc_id, text in scored[:top_k]:
                match = Document(id=doc_id, text=text, tags={"shard": self.runtime_args.shard_id})
                match.set_score("jaccard", score)
                query.matches.append(match)

    @requests(on="/count")
    def count(self, docs: DocumentList, parameters: dict, **kwargs: Any) -> list[Document]:
        with self._lock:
            self._refresh()
            total = len(self._entries)
        return [Document(text=str(total), tags={"shard": self.runtime_args.shard_id, "count": total})]
