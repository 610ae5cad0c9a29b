"""A merge benchmark process, driven by JSON lines on stdin (see merge.py).

Runs in shardnet's virtual environment (impl ``shardnet``: ``merge_shard_responses``) or in the Jina peer's
(impl ``jina``: ``WorkerRequestHandler.reduce_requests``, what Jina 3.34's head calls under ALL). Each run
merges the shard answers of one shape, read once from files, ``n`` times, from bytes to bytes as a head
receives and sends them, and answers with the CPU seconds per merge and the merged documents and matches counted.

    {"cmd": "run", "impl": "shardnet", "shards": ["/tmp/s0.bin", "/tmp/s1.bin"], "n": 5}
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback


def counted(docs) -> list[int]:
    """The merged documents and their matches, counted: both merges must agree on them."""
    return [len(docs), sum(len(doc.matches) for doc in docs)]


def shardnet_merger():
    from shardnet.protocol.messages import DataRequest
    from shardnet.runtimes.merge import merge_shard_responses

    def merge(answers: list[bytes]) -> tuple[bytes, int]:
        merged = merge_shard_responses("bench", [(shard, DataRequest.from_bytes(b)) for shard, b in enumerate(answers)])
        return merged.to_bytes(), counted(merged.proto.data.docs.docs)

    return merge


def jina_merger():
    from jina.proto.serializer import DataRequestProto
    from jina.serve.runtimes.worker.request_handling import WorkerRequestHandler
    from jina.types.request.data import DataRequest

    def merge(answers: list[bytes]) -> tuple[bytes, int]:
        merged = WorkerRequestHandler.reduce_requests([DataRequest(b) for b in answers])
        return DataRequestProto.SerializeToString(merged), counted(merged.proto.data.docs.docs)

    return merge


def main() -> int:
    mergers = {}
    cached: dict[str, bytes] = {}

    def reply(message: dict) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    reply({"ready": True, "python": sys.executable})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            command = json.loads(line)
            impl = command["impl"]
            if impl not in mergers:
                mergers[impl] = {"shardnet": shardnet_merger, "jina": jina_merger}[impl]()
            merge = mergers[impl]
            answers = []
            for path in command["shards"]:
                if path not in cached:
                    with open(path, "rb") as handle:
                        cached[path] = handle.read()
                answers.append(cached[path])
            gc.collect()  # outside the timed merges: the last run's garbage is not this one's cost
            started = time.process_time()
            for _ in range(command["n"]):
                encoded, docs = merge(answers)
            cpu = time.process_time() - started
            reply({"cpu_per_merge": cpu / command["n"], "docs": docs, "bytes": len(encoded)})
        except Exception:
            reply({"error": traceback.format_exc()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
