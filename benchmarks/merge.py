"""Benchmark 6: what merging the shards' answers under ALL costs a head, shardnet's merge against Jina 3.34's.

A head polling ALL receives every shard's answer as bytes, merges them by
document id (docarray's ``reduce``: a document's fields from its first copy,
empty ones from later copies, matches and chunks folded in) and sends the
result as bytes. This runs that step alone, with no network, on answers of
three shapes, in two processes (shardnet's venv, Jina's), rounds interleaved,
and prints each one's CPU time per merge and the ratio. The merged documents
and matches are counted and must agree; a row where they do not is marked.

    python benchmarks/merge.py --peer jina     # about 1 min
    python benchmarks/merge.py --quick --peer jina

Shapes, 2 shards (``--shards``) x ``--queries`` queries, each with a 128-float embedding:
  search: each shard answers every query with 20 matches of its own (text, embedding, a score)
  echoed: the same, plus 30 matches the request already carried to every shard, sent back by each
  index: each shard answers with the documents it was sent, unchanged (ALL /index, every shard storing its part)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    JINA_PYTHON,
    SHARDNET_PYTHON,
    JsonProcess,
    exit_on_sigterm,
    machine_line,
    median,
    paired_ratio_interval,
    run_script,
    table,
)

SHAPES = ("search", "echoed", "index")
OWN_MATCHES, ECHOED_MATCHES, DIMENSIONS = 20, 30, 128


def shard_answer(shape: str, shard: int, queries: int) -> bytes:
    """One shard's answer of the given shape, as a worker sends it."""
    import numpy as np

    from shardnet.protocol.documents import Document
    from shardnet.protocol.messages import DataRequest

    vectors = np.random.default_rng(7).random((queries, DIMENSIONS), dtype=np.float32)  # the same in every shard
    own = np.random.default_rng(100 + shard).random((OWN_MATCHES, DIMENSIONS), dtype=np.float32)
    docs = []
    for index in range(queries):
        query = Document(id=f"q{index}", text=f"query {index}", embedding=vectors[index])
        if shape != "index":
            if shape == "echoed":
                query.matches.extend(
                    Document(id=f"carried-{index}-{rank}", text="carried", tags={"rank": rank})
                    for rank in range(ECHOED_MATCHES)
                )
            for rank in range(OWN_MATCHES):
                match = Document(id=f"s{shard}-{index}-{rank}", text=f"hit {rank}", embedding=own[rank])
                match.proto.scores["cosine"].value = 1.0 - rank / OWN_MATCHES
                query.matches.append(match)
        docs.append(query)
    return DataRequest(docs=docs, endpoint="/search").to_bytes()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", choices=("none", "jina"), default="none")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--merges", type=int, default=3, help="merges per round and process")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 2 merges")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    if args.quick:
        args.rounds, args.merges = 3, 2
    if args.peer == "jina" and not os.path.exists(JINA_PYTHON):
        sys.exit(f"--peer jina needs the Jina 3.34 venv at {JINA_PYTHON} (or set SHARDNET_JINA_PYTHON)")

    with tempfile.TemporaryDirectory() as scratch:
        files = {}
        for shape in SHAPES:
            files[shape] = []
            for shard in range(args.shards):
                path = os.path.join(scratch, f"{shape}-{shard}.bin")
                Path(path).write_bytes(shard_answer(shape, shard, args.queries))
                files[shape].append(path)
        impls = [("shardnet", SHARDNET_PYTHON)] + ([("jina", JINA_PYTHON)] if args.peer == "jina" else [])
        processes = {}
        try:
            for impl, python in impls:
                processes[impl] = JsonProcess(python, "_merge_worker.py")
            cpu = {(impl, shape): [] for impl, _ in impls for shape in SHAPES}
            docs = {}
            for shape in SHAPES:  # warm-up, and the merged counts
                for impl, _ in impls:
                    docs[(impl, shape)] = processes[impl].command(cmd="run", impl=impl, shards=files[shape], n=1)["docs"]
            for round_index in range(args.rounds):
                order = impls if round_index % 2 == 0 else impls[::-1]
                for shape in SHAPES:
                    for impl, _ in order:
                        result = processes[impl].command(cmd="run", impl=impl, shards=files[shape], n=args.merges)
                        cpu[(impl, shape)].append(result["cpu_per_merge"])
        finally:
            for process in processes.values():
                process.stop()

    print(f"# merge under ALL: {args.shards} shards x {args.queries} queries, {args.rounds} interleaved rounds x "
          f"{args.merges} merges, bytes to bytes; {machine_line()}")
    rows = []
    for shape in SHAPES:
        for impl, _ in impls:
            per_merge = cpu[(impl, shape)]
            rows.append([f"{impl} [{shape}]", *docs[(impl, shape)], median(per_merge) * 1e3,
                         min(per_merge) * 1e3, max(per_merge) * 1e3])
    print(table(["merge", "merged docs", "their matches", "CPU ms/merge (median)", "min", "max"], rows))
    if args.peer != "jina":
        return 0
    print()
    ratio_rows = []
    for shape in SHAPES:
        ours, theirs = cpu[("shardnet", shape)], cpu[("jina", shape)]
        low, high = paired_ratio_interval(ours, theirs)
        agree = docs[("shardnet", shape)] == docs[("jina", shape)]
        ratio_rows.append([f"shardnet / jina [{shape}]", sum(ours) / sum(theirs), f"{low:.2f}-{high:.2f}",
                           "yes" if agree else "NO: merged documents or matches differ"])
    print(table(["ratio", "CPU/merge", "95 % interval", "same merged docs"], ratio_rows))
    return 0


if __name__ == "__main__":
    run_script(main)
