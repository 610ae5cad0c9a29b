"""``Echo``: an Executor whose one handler does nothing, so documents come back unchanged.

It is the trivial executor of the head overhead benchmark: whatever a request
costs in front of it is the networking's, not the handler's. The handler is
async, so no thread hop is added either.

    shardnet worker --uses shardnet.examples.echo:Echo --port 0
"""

from __future__ import annotations

from typing import Any

from shardnet.protocol.documents import DocumentList
from shardnet.runtimes.executor import Executor, requests


class Echo(Executor):
    """Answer every endpoint with the documents it was sent, untouched."""

    @requests
    async def echo(self, docs: DocumentList, parameters: dict, **kwargs: Any) -> None:
        return None
