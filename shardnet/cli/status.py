"""``shardnet status``: is a head or worker serving, and what does it route to."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import urllib.parse
from typing import Any, Optional, Sequence, Union

import grpc
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2

from shardnet.cli.options import (
    add_client_tls_arguments, client_tls, listed_endpoints, positive_seconds, shown_endpoints,
)
from shardnet.errors import MalformedReplyError, ReplicaError
from shardnet.networking import oneshot
from shardnet.networking.addresses import entity_address
from shardnet.networking.channels import NOT_CONNECTED, shown_details
from shardnet.networking.tls import ClientTls
from shardnet.protocol import services
from shardnet.protocol.messages import ControlRequest
from shardnet.runtimes.head import USES_AFTER, USES_BEFORE
from shardnet.runtimes.log_lines import printable

# the exit code when a replica the head routes to is down or was not checked in time, but no shard is known to have
# none serving
DEGRADED = 3


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status", help="health, endpoints and replicas of a head or worker",
        description="Health, readiness, endpoints and replicas of a head or worker; a head checks each replica it "
        "routes to now. Exits 0 when all is well; 1 when it is not serving or not ready, its endpoints or replicas "
        "cannot be listed, or a shard, a uses_before or a uses_after has no replica, or none serving; 2 when it "
        "cannot be reached at all; "
        f"{DEGRADED} (degraded) when a replica is down, or was not checked in time, but no shard is known to have "
        "none serving, or a Kubernetes head's discovery is failing (its view may be stale); 74 when its output "
        "could not be written.",
    )
    parser.add_argument("target", help="HOST:PORT (https://HOST:PORT for TLS)")
    parser.add_argument(
        "--timeout", type=positive_seconds("timeout"), metavar="SECONDS", default=5.0,
        help="seconds the whole check may take, a head's check of its replicas included: a replica that does not "
        "answer within 1 s is named as not answering, so give 2 s or more to hear of a hung one (with less, it is "
        "not checked: incomplete, exit 3) (default: %(default)g)",
    )
    parser.add_argument(
        "--json", action="store_true",
        help="print what was found as one JSON object instead of lines (the exit code is the same), for scripts "
        "and monitors; one that cannot reach the server prints {..., \"state\": \"unreachable\"} too",
    )
    add_client_tls_arguments(parser)
    parser.set_defaults(handler=run)


class _Report:
    """What the check found, as the lines a person reads and as the same facts for a program (``--json``): each
    fact is noted where its line is said, so that the two cannot tell different stories."""

    def __init__(self, target: str):
        self.lines: list[str] = []
        self.facts: dict[str, Any] = {"target": target}

    def say(self, line: str, **facts: Any) -> None:
        self.lines.append(line)
        self.facts.update(facts)

    def replica(self, kind: str, line: str, **fact: Any) -> None:
        """A line of the replica listing, and its fact appended to the list ``kind`` (replicas, hops)."""
        self.lines.append(line)
        self.facts.setdefault(kind, []).append(fact)

    def shown(self, as_json: bool) -> str:
        """The report as printed: lines (what a server said in them shown, never obeyed by the terminal:
        ``printable``), or one JSON object (ASCII, escaped as JSON escapes it: inert too)."""
        if as_json:
            return json.dumps(self.facts, indent=2, sort_keys=True)
        return "\n".join(printable(line) for line in self.lines)


async def _ask(
    args: argparse.Namespace, tls: Optional[ClientTls], method: str, payload: Any,
    metadata: Sequence[tuple[str, str]] = (),
) -> Union[tuple[Any, Any], ReplicaError, MalformedReplyError]:
    """(response, trailing metadata) of one call to the target within ``--timeout``, or the error it failed with."""
    try:
        return await oneshot.call_once(method, payload, args.target, timeout=args.timeout, tls=tls, metadata=metadata)
    except (ReplicaError, MalformedReplyError) as exc:
        return exc


# the exit code of a check stopped by SIGTERM (`timeout 5 shardnet status --json`, a probe's own deadline): 128 + 15,
# what a process killed by it exits with, its --json object printed all the same
TERMINATED = 143


async def status(args: argparse.Namespace, terminated: Optional[list] = None) -> int:
    # its TLS files read before anything is asked or printed: one refused (missing, not PEM) is refused as a flag
    # argparse refuses (exit 2, said on stderr, no --json object), not an object whose state and exit_code are null
    tls = client_tls(args)
    report = _Report(args.target)
    try:
        code = await _check(args, report, tls)
    except ReplicaError as exc:  # the server could not be reached (exit 2), or refused STATUS with an error answer
        report.facts.update(state="unreachable" if not report.lines else "failed", error=str(exc),
                            exit_code=2)
        raise
    except (asyncio.CancelledError, KeyboardInterrupt):  # Ctrl-C (asyncio.run cancels this task): 130, said so
        report.facts.update(state="interrupted", exit_code=TERMINATED if terminated else 130)
        raise
    else:
        report.facts.update(state=_STATES[code], exit_code=code)
        return code
    finally:
        for key in _JSON_KEYS:  # one schema whatever path the check took: null where it is not known
            report.facts.setdefault(key, None)
        if report.lines or args.json:
            print(report.shown(args.json))


# the keys every --json object has (null when not known: the server unreachable, a Jina server, a draining head,
# a health port, a check interrupted), besides those a path adds (``..._error``, ``error``)
_JSON_KEYS = ("target", "state", "exit_code", "health", "ready", "endpoints", "replicas", "hops", "empty_shards",
              "empty_shards_unlisted", "ejected_unlisted", "empty_hops", "hops_unlisted", "replica_health",
              "discovery", "retries")

# what each exit code of a check that got answers says, as --json's "state"
_STATES = {0: "ok", 1: "unhealthy", DEGRADED: "degraded"}


async def _check(args: argparse.Namespace, report: _Report, tls: Optional[ClientTls]) -> int:
    """Ask the target, note what it said in ``report``, and return the exit code it earns (raising
    ReplicaError when it cannot be reached)."""
    # asked all at once, so that --timeout bounds the whole check: a head asks its workers for its endpoints and
    # checks its replicas within the caller's time, and a hung one would otherwise take it twice
    health, ready, endpoints, control = await asyncio.gather(
        _ask(args, tls, "health", health_pb2.HealthCheckRequest()),
        _ask(args, tls, "health", health_pb2.HealthCheckRequest(service=services.READY_SERVICE)),
        _ask(args, tls, "discovery", empty_pb2.Empty()),
        _ask(args, tls, "control", ControlRequest("STATUS"), ((services.CHECK_REPLICAS_METADATA, "1"),)),
    )
    target = args.target
    if isinstance(health, ReplicaError):
        if health.code == grpc.StatusCode.DEADLINE_EXCEEDED:  # nothing answered at all: exit 2, saying how long
            raise health.noted(f" (no answer to a health check within --timeout {args.timeout:g}s)") from None
        if health.cause.lower().startswith(NOT_CONNECTED):
            raise health  # nothing answered at all: exit 2
        # it answered, but no health check (exit 1)
        report.say(f"{target}: health unknown ({health.cause})", health=None, health_error=health.cause)
        healthy = False
    elif isinstance(health, MalformedReplyError):
        report.say(f"{target}: health unknown ({health.cause})", health=None, health_error=health.cause)
        healthy = False
    else:
        serving = health_pb2.HealthCheckResponse.ServingStatus.Name(health[0].status)
        report.say(f"{target}: {serving}", health=serving)
        healthy = health[0].status == health_pb2.HealthCheckResponse.SERVING
    # shardnet servers also answer readiness (a head fed by discovery: once it has listed a worker of every shard)
    if isinstance(ready, Exception):  # a Jina server has no such service
        report.say(f"ready: unknown ({ready.cause})", ready=None, ready_error=ready.cause)
    else:
        serving = health_pb2.HealthCheckResponse.ServingStatus.Name(ready[0].status)
        report.say(f"ready: {serving}", ready=serving)
        healthy = healthy and ready[0].status == health_pb2.HealthCheckResponse.SERVING
    # a head asks its workers: a hung one fails this, and the replica list below still says who is there
    if isinstance(endpoints, Exception):
        report.say(f"endpoints: unknown ({endpoints.cause})", endpoints=None, endpoints_error=endpoints.cause)
        healthy = False
    else:
        listed = shown_endpoints(endpoints[0].endpoints)
        # the server's own names (one may hold ", ", which the line cannot tell apart), as the line leaves them
        report.say(f"endpoints: {listed or '(none)'}", endpoints=listed_endpoints(endpoints[0].endpoints))
    if isinstance(control, Exception):  # not send_control: the trailing metadata says what is ejected and down
        # a Jina 3.34 server has no control service: no shardnet head
        if getattr(control, "code", None) == grpc.StatusCode.UNIMPLEMENTED:
            if getattr(endpoints, "code", None) == grpc.StatusCode.UNIMPLEMENTED and not isinstance(health, Exception):
                # health checks answered and nothing else: a server's plaintext --health-port, not its --port
                report.say("replicas: none listed (only health checks answer here: a --health-port? ask its --port)",
                           replicas=None, replicas_error="only health checks answer here")
                return 1
            report.say(f"replicas: none listed ({control.cause}: not a shardnet server)", replicas=None,
                       replicas_error=f"{control.cause}: not a shardnet server")
            return 0 if healthy else 1
        # a draining server refuses it: said, as the rest is
        report.say(f"replicas: unknown ({control.cause})", replicas=None, replicas_error=control.cause)
        return 1
    control, trailing = control
    if control.is_error:
        raise ReplicaError(shown_details(control.status.description), address=target)
    notes = _replica_notes(trailing)
    hops = notes["hops"] or notes["empty_hops"] or notes["hops_unlisted"]
    report.facts.update(replicas=[], hops=[])
    if control.related_entities or notes["empty_ranges"] or notes["empty_unlisted"] or hops:
        report.say("replicas:")
    for entity in control.related_entities:
        address = entity_address(entity.address, entity.port)
        report.replica("replicas", f"  shard {entity.shard_id}: {_marked(notes, entity.shard_id, address)}",
                       shard=entity.shard_id, **_marks(notes, entity.shard_id, address))
    report.facts.update(empty_shards=notes["empty"], empty_shards_unlisted=notes["empty_unlisted"],
                        ejected_unlisted=notes["unlisted"], empty_hops=notes["empty_hops"],
                        hops_unlisted=notes["hops_unlisted"])
    for shard_id in notes["empty"]:
        report.say(f"  shard {shard_id}: no replica")
    if notes["empty_ranges"] and not notes["empty"]:  # too many to name one by one: as the head gave them
        report.say(f"  shards {notes['empty_ranges']}: no replica", empty_shard_ranges=notes["empty_ranges"])
    if notes["empty_unlisted"]:
        report.say(f"  ... and {notes['empty_unlisted']} more shards with no replica, not named")
    if notes["unlisted"]:
        report.say(f"  ... and {notes['unlisted']} more ejected replicas, not named")
    for role, address in notes["hops"]:  # a head's uses_before and uses_after (one of an earlier version: none)
        report.replica("hops", f"  {role}: {_marked(notes, role, address)}", role=role, **_marks(notes, role, address))
    for role in notes["empty_hops"]:
        report.say(f"  {role}: no replica")
    if notes["hops_unlisted"]:
        report.say(f"  ... and {notes['hops_unlisted']} more replicas of {USES_BEFORE} or {USES_AFTER}, not named")
    if notes["empty_ranges"] or notes["empty_unlisted"] or notes["empty_hops"]:
        healthy = False  # a request to ALL fails naming the shard, and one to it goes nowhere; every one, a hop
    degraded = _say_replica_health(report, notes, listed=bool(control.related_entities or notes["hops"]))
    if notes["shards_down_ranges"] or notes["shards_down_unlisted"] or notes["hops_down"]:
        healthy = False  # as a shard or a hop with no replica: every request to it, or through it, fails
    report.facts["discovery"] = notes["discovery"] or None
    if notes["discovery"]:  # a Kubernetes head whose view of its workers may be stale: all else is as it sees it
        report.say(f"discovery: {notes['discovery']}")
        degraded = True
    budget = {key: value for key, value in trailing or () if key in _BUDGET_KEYS}
    report.facts["retries"] = {key: budget[key] for key in _BUDGET_KEYS if key in budget}
    if budget:
        report.say("retries: " + ", ".join(f"{key} {value}" for key, value in report.facts["retries"].items()))
    return 1 if not healthy else DEGRADED if degraded else 0


def _marked(notes: dict, where: Union[int, str], address: str) -> str:
    """A replica's address with what the head said of it (ejected or draining, down and why); ``where``: its shard
    id, or the role of the hop it serves."""
    marks = ["ejected: failing, probed until healthy"] if (where, address) in notes["ejected"] else (
        ["draining: not picked until it serves again"] if (where, address) in notes["draining"] else []
    )
    if (where, address) in notes["down"]:
        marks.append(f"down: {notes['down'][where, address]}")
    return address + (f" ({'; '.join(marks)})" if marks else "")


def _marks(notes: dict, where: Union[int, str], address: str) -> dict[str, Any]:
    """``_marked``'s facts for --json: the address, whether it is ejected (failing) or draining (set aside as it
    drains), and why it is down (None: it is not known to be)."""
    return {"address": address, "ejected": (where, address) in notes["ejected"],
            "draining": (where, address) in notes["draining"], "down": notes["down"].get((where, address))}


def _say_replica_health(report: _Report, notes: dict, listed: bool) -> bool:
    """Say what the head's check of its replicas found (the shards and hops none serves, the replicas down it
    could not name, then a summary line); True when some replica is down or was not checked in time (not all is
    known well)."""
    checked = notes["checked"]
    if checked is None:
        report.facts["replica_health"] = None
        if listed:  # a worker lists none; a head of another version, or Jina's, does not check them
            report.say("replica health: not checked (the head does not report it)")
        return False
    down, unchecked = len(notes["down"]) + notes["down_unlisted"], notes["unchecked"]
    report.facts["replica_health"] = {
        "checked": checked, "down": down, "unchecked": unchecked,
        "age_seconds": None if notes["age"] is None else float(notes["age"]),
        "shards_down": notes["shards_down"], "shards_down_ranges": notes["shards_down_ranges"],
        "shards_down_unlisted": notes["shards_down_unlisted"], "hops_down": notes["hops_down"],
    }
    for shard_id in notes["shards_down"]:
        report.say(f"  shard {shard_id}: no serving replica")
    if notes["shards_down_ranges"] and not notes["shards_down"]:
        report.say(f"  shards {notes['shards_down_ranges']}: no serving replica")
    for role in notes["hops_down"]:
        report.say(f"  {role}: no serving replica")
    if notes["shards_down_unlisted"]:
        report.say(f"  ... and {notes['shards_down_unlisted']} more shards with no serving replica, not named")
    if notes["down_unlisted"]:
        report.say(f"  ... and {notes['down_unlisted']} more replicas down, not named")
    age = "" if notes["age"] is None else f" (as checked {notes['age']}s ago)"
    if not down and not unchecked:
        if checked:  # an empty shard is said above
            report.say(f"replica health: all {checked} listed replicas serving{age}")
        return False
    # a hop's replica down beside a live one is degraded too: said, so that it does not read as a shard's
    where = f"every shard{' and hop' if notes['hops'] else ''} has a serving one (degraded)"
    if unchecked:  # neither serving nor down: a shard whose replicas were not all checked may have none serving
        where = f"{unchecked} not checked within the time (incomplete)"
    shards, unlisted = notes["shards_down_ranges"], notes["shards_down_unlisted"]
    several = bool(unlisted) or "," in shards or "-" in shards
    named = [f"shard{'s' if several else ''} {shards}" + (f" and {unlisted} more" if unlisted else "")] if (
        shards or unlisted
    ) else []
    named += notes["hops_down"]
    if named:
        several = several or len(named) > 1
        where = f"{' and '.join(named)} {'have' if several else 'has'} none serving" + (
            f", {unchecked} not checked within the time" if unchecked else ""
        )
    report.say(f"replica health: {down} of {checked + unchecked} replicas down, {where}{age}")
    return True


_BUDGET_KEYS = ("requests-seen", "retries-spent", "retries-refused", "retry-window")
_HOP_ROLES = (USES_BEFORE, USES_AFTER)  # "hop", "hop-down", "empty-hops" and "hops-down" as a head writes them
_RANGES = re.compile(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*")  # "empty-shards" and "shards-down" as a head writes them
_SECONDS = re.compile(r"[0-9]{1,9}(\.[0-9]{1,3})?")  # "replica-check-age" as a head writes it


def _replica_notes(trailing) -> dict:
    """A head's STATUS trailing metadata read back: ejected (shard, address) pairs, how many more were not named,
    and the empty shard ids; its hops' replicas as (role, address), ejected ones among the ejected pairs, how many
    more, and the hops with none; from its check of the replicas, how many it checked (None: no check reported),
    each (shard or role, address) down with why, how many more, the shards and hops none of whose replicas serves,
    how many replicas it did not reach in time, and its age when the head reused it; a Kubernetes head's discovery
    problem. A worker, or a Jina head,
    says none of it (nor a head of an earlier version of the hops); a value that does not read is skipped."""
    notes = {"ejected": set(), "draining": set(), "empty": [], "unlisted": 0, "empty_unlisted": 0, "empty_ranges": "",
             "checked": None, "down": {}, "down_unlisted": 0, "shards_down": [], "shards_down_ranges": "",
             "shards_down_unlisted": 0,
             "unchecked": 0, "age": None, "hops": [], "hops_unlisted": 0, "empty_hops": [], "hops_down": [],
             "discovery": ""}
    counts = {
        services.EJECTED_UNLISTED_METADATA: "unlisted", services.EMPTY_SHARDS_UNLISTED_METADATA: "empty_unlisted",
        services.REPLICAS_CHECKED_METADATA: "checked", services.REPLICAS_DOWN_UNLISTED_METADATA: "down_unlisted",
        services.SHARDS_DOWN_UNLISTED_METADATA: "shards_down_unlisted",
        services.REPLICAS_UNCHECKED_METADATA: "unchecked", services.HOPS_UNLISTED_METADATA: "hops_unlisted",
    }
    for key, value in trailing or ():
        if key == services.EJECTED_METADATA:
            shard, address, mark = (value.split(" ", 2) + ["", ""])[:3]
            if shard.isdigit() and address and mark in ("", "draining"):
                notes["draining" if mark else "ejected"].add((int(shard), urllib.parse.unquote(address)))
        elif key == services.REPLICA_DOWN_METADATA:
            shard, address, cause = (value.split(" ", 2) + ["", ""])[:3]
            if shard.isdigit() and address and cause:
                notes["down"][int(shard), urllib.parse.unquote(address)] = urllib.parse.unquote(cause)
        elif key == services.HOP_METADATA:
            role, address, mark = (value.split(" ", 2) + ["", ""])[:3]
            # " draining": a head of bfaa207..fe5923a marked a draining hop's replica so (dropping it lost the line)
            if role in _HOP_ROLES and address and mark in ("", "ejected", "draining"):
                notes["hops"].append((role, urllib.parse.unquote(address)))
                if mark:
                    notes[mark].add(notes["hops"][-1])
        elif key == services.HOP_DRAINING_METADATA:
            role, _, address = value.partition(" ")
            if role in _HOP_ROLES and address:
                notes["draining"].add((role, urllib.parse.unquote(address)))
        elif key == services.HOP_DOWN_METADATA:
            role, address, cause = (value.split(" ", 2) + ["", ""])[:3]
            if role in _HOP_ROLES and address and cause:
                notes["down"][role, urllib.parse.unquote(address)] = urllib.parse.unquote(cause)
        elif key in (services.EMPTY_HOPS_METADATA, services.HOPS_DOWN_METADATA):
            roles = value.split(",")
            if all(role in _HOP_ROLES for role in roles):
                notes["empty_hops" if key == services.EMPTY_HOPS_METADATA else "hops_down"] = roles
        elif key in counts and value.isdigit():
            notes[counts[key]] = int(value)
        elif key == services.EMPTY_SHARDS_METADATA and _RANGES.fullmatch(value):
            notes["empty"], notes["empty_ranges"] = _shard_ids(value), value
        elif key == services.SHARDS_DOWN_METADATA and _RANGES.fullmatch(value):
            notes["shards_down"], notes["shards_down_ranges"] = _shard_ids(value), value
        elif key == services.REPLICA_CHECK_AGE_METADATA and _SECONDS.fullmatch(value):
            notes["age"] = value
        elif key == services.DISCOVERY_FAILING_METADATA:
            notes["discovery"] = urllib.parse.unquote(value)
    return notes


def _shard_ids(ranges: str, most: int = 65536) -> list[int]:
    """"0-3,7" (as ``_RANGES`` reads it) as [0, 1, 2, 3, 7]; nothing when that names more than ``most`` shards."""
    ids: list[int] = []
    for part in ranges.split(","):
        first, _, last = part.partition("-")
        if len(ids) + int(last or first) - int(first) >= most:
            return []
        ids.extend(range(int(first), int(last or first) + 1))
    return ids


def run(args: argparse.Namespace) -> int:
    """The check; SIGTERM ends it as Ctrl-C does (printing what it found, --json's object valid, state
    "interrupted"), exiting TERMINATED instead of dying with nothing printed."""
    terminated: list = []

    async def checked() -> int:
        task = asyncio.current_task()

        def stop() -> None:
            terminated.append(True)
            task.cancel()

        # only where SIGTERM would kill the process: a program calling main() with a handler of its own keeps it
        # (the loop's close sets SIGTERM back to SIG_DFL, not to what it was); none off the main thread, or no SIGTERM
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError, AttributeError):
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop)
        return await status(args, terminated)

    try:
        return asyncio.run(checked())
    except asyncio.CancelledError:
        if terminated:
            return TERMINATED
        raise
