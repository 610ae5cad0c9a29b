"""The Executor the fault-injection harness serves: echoes, records what it saw, misbehaves on request.

Faults are switched on and off while the worker runs, through a small JSON
file in the shared workspace (``fault-<shard>-<replica>.json``, written
atomically by ``set_fault``): ``{"delay": 0.3}`` answers slowly,
``{"fail": true}`` raises (an application error: status ERROR, gRPC OK).
Every document id the replica handled is appended to
``seen-<shard>-<replica>.log``, and those it failed on purpose to
``failed-<shard>-<replica>.log``, so the harness can count how often a
request was executed, where, and whether an application error was retried.

A worker process loads this file by path (``--uses .../_fault_executor.py:FaultExecutor``);
it imports nothing but shardnet and the standard library.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any, Optional

from shardnet import Executor, requests


def fault_path(workspace: os.PathLike, shard: int, replica: int) -> Path:
    return Path(workspace) / f"fault-{shard}-{replica}.json"


def set_fault(workspace: os.PathLike, shard: int, replica: int, **fault: Any) -> None:
    """Give replica (shard, replica) a fault (``delay=``, ``fail=``); no keywords clears it."""
    path = fault_path(workspace, shard, replica)
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(fault))
    os.replace(staging, path)  # a reader sees the old file or the new one, never half of one


def read_seen(workspace: os.PathLike, kind: str = "seen") -> dict[str, list[tuple[int, int]]]:
    """Document id -> the (shard, replica) of every execution of it (``kind="failed"``: every injected failure)."""
    executions: dict[str, list[tuple[int, int]]] = {}
    for path in Path(workspace).glob(f"{kind}-*-*.log"):
        _, shard, replica = path.stem.split("-")
        for line in path.read_text().split():
            executions.setdefault(line, []).append((int(shard), int(replica)))
    return executions


class FaultExecutor(Executor):
    """Answers every endpoint with the documents it got, tagged with shard and replica."""

    def __init__(self, record: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        args = self.runtime_args
        self._workspace = Path(args.workspace or ".")
        self._fault_file = fault_path(self._workspace, args.shard_id, args.replica_id)
        self._fault_stamp: Optional[int] = None
        self._fault: dict[str, Any] = {}
        record = record and args.workspace is not None  # the logs live in the workspace, never in the current folder
        self._seen = self._log("seen") if record else None
        self._failed = self._log("failed") if record else None

    def _log(self, kind: str) -> int:
        path = self._workspace / f"{kind}-{self.runtime_args.shard_id}-{self.runtime_args.replica_id}.log"
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _current_fault(self) -> dict[str, Any]:
        try:
            stamp = os.stat(self._fault_file).st_mtime_ns
        except FileNotFoundError:
            self._fault_stamp, self._fault = None, {}
            return self._fault
        if stamp != self._fault_stamp:
            self._fault_stamp, self._fault = stamp, json.loads(self._fault_file.read_text() or "{}")
        return self._fault

    @requests
    async def echo(self, docs, parameters, **kwargs: Any) -> None:
        if self._seen is not None and len(docs):
            os.write(self._seen, "".join(f"{doc.id}\n" for doc in docs).encode())
        fault = self._current_fault()
        if fault.get("delay"):
            await asyncio.sleep(float(fault["delay"]))
        if fault.get("fail"):
            if self._failed is not None and len(docs):
                os.write(self._failed, "".join(f"{doc.id}\n" for doc in docs).encode())
            raise RuntimeError(
                f"injected application error on shard {self.runtime_args.shard_id} replica {self.runtime_args.replica_id}"
            )
        for doc in docs:
            doc.tags["shard"] = self.runtime_args.shard_id
            doc.tags["replica"] = self.runtime_args.replica_id
