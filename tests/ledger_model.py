"""A randomized model check of K8sGrpcConnectionPool's membership ledger (discovery/kubernetes.py).

A model cluster (pods, Services, the EndpointSlice controller lagging the pods, two watch streams with selectors)
drives the pool's handlers (``_on_event`` / ``_on_list``) directly, the pool not started, as the watches would.
After every step the pool's routing is checked:

1. no address is routed as two roles of one deployment;
2. every routed member is held by the word of at least one source as last delivered to the pool;
3. routing is what the ledger holds uncontested (the pool and the ledger agree);
4. a member routed only by a slice endpoint whose pod the pods said is going or gone is a fault;
Q. at quiescence (Services synced to the pods, both sources up and caught up) routing is the truth exactly.

Run: python tests/ledger_model.py [first_seed] [count] [steps]
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import sys
from typing import Any, Optional

from shardnet.discovery.kubernetes import PODS, SLICES, K8sGrpcConnectionPool, Member, pod_members, slice_members
from shardnet.discovery.watch import object_key

PORT = 9000
IPS = [f"10.0.0.{i}" for i in range(1, 6)]
DEPS = ["dep", "dep2"]
ROLES = [("HEAD", 0), ("WORKER", 0), ("WORKER", 1), ("WORKER", 2), ("USES_AFTER", 0)]
SERVICES = [(dep, role, shard) for dep in DEPS for role, shard in ROLES]


@dataclasses.dataclass
class Pod:
    name: str
    dep: str
    role: str  # HEAD / WORKER
    shard: int
    ip: Optional[str]
    ready: bool
    deleting: bool = False
    phase: str = "Running"


def pod_obj(uid: str, p: Pod) -> dict:
    labels = {"jina_deployment_name": p.dep, "pod_type": p.role}
    if p.role == "WORKER":
        labels["shard_id"] = str(p.shard)
    meta: dict[str, Any] = {"name": p.name, "namespace": "default", "uid": uid, "labels": labels}
    if p.deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status: dict[str, Any] = {
        "phase": p.phase,
        "conditions": [{"type": "Ready", "status": "True" if p.ready else "False"}],
        "containerStatuses": [{"name": "executor", "ready": p.ready}],
    }
    if p.ip:
        status["podIP"] = p.ip
    spec = {"containers": [{"name": "executor", "ports": [{"name": "grpc", "containerPort": PORT}]}]}
    return {"metadata": meta, "spec": spec, "status": status}


def svc_name(svc) -> str:
    dep, role, shard = svc
    return f"{dep}-head" if role == "HEAD" else f"{dep}-uses-after" if role == "USES_AFTER" else f"{dep}-{shard}"


def slice_obj(svc, suffix: str, gen: int, endpoints: list[dict]) -> dict:
    dep, role, shard = svc
    return {
        "metadata": {
            "name": f"{svc_name(svc)}-{suffix}", "namespace": "default", "uid": f"{svc_name(svc)}-{suffix}-g{gen}",
            "labels": {"shardnet.io/deployment": dep,
                       "shardnet.io/role": {"HEAD": "head", "USES_AFTER": "uses_after"}.get(role, "worker"),
                       "shardnet.io/shard": str(shard) if role == "WORKER" else ""},
        },
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": PORT, "protocol": "TCP"}],
        "endpoints": endpoints,
    }


class CheckingPool(K8sGrpcConnectionPool):
    """Notes, the moment it happens, an address added while routed as another role of its deployment (requests
    are routed at every await of a handler, not only between events), and a deployment emptied while a relist
    runs (checked once the relist is over: a fault if it has members again, the relist's own doing)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.faults: list[str] = []
        self.emptied_in_relist: set[str] = set()

    def add_connection(self, deployment: str, address: str, head: bool = False, shard_id: Optional[int] = None) -> None:
        owner = deployment.partition("/")[0]
        roles = []
        for name, entry in self.deployments.items():
            if name.partition("/")[0] != owner:
                continue
            roles += ([(name, "head", None)] if address in entry["head"] else []) + [
                (name, "shard", shard) for shard, addresses in entry["shards"].items() if address in addresses
            ]
        if roles:
            mine = (deployment, "head", None) if head else (deployment, "shard", shard_id or 0)
            others = [role for role in roles if role != mine]
            if others:
                self.faults.append(f"1: {address} added as {mine} of {deployment} while routed as {others}")
        super().add_connection(deployment, address, head=head, shard_id=shard_id)

    async def remove_connection(self, deployment: str, address: str, head: bool = False, shard_id=None, **kw):
        removed = await super().remove_connection(deployment, address, head=head, shard_id=shard_id, **kw)
        entry = self.deployments.get(deployment)
        if self._ledger._relists and entry is not None and not entry["head"] and not any(entry["shards"].values()):
            self.emptied_in_relist.add(deployment)
        if self._ledger._relists and entry is not None and not head and shard_id is not None:
            if not entry["shards"].get(shard_id):
                self.emptied_in_relist.add((deployment, shard_id))
        return removed


class Source:
    def __init__(self, name: str):
        self.name = name
        self.queue: list[tuple[str, dict]] = []
        self.down = False
        self.failing = False  # the pool reads this (FakeWatch)
        self.relist_wanted = False
        self.delivered: dict[str, dict] = {}  # key -> obj as the pool was last told

    def relist_when_back(self) -> None:
        self.relist_wanted = True


class Model:
    def __init__(self, pool: K8sGrpcConnectionPool, followed: Optional[tuple[str, ...]], log: Optional[list] = None):
        self.pool = pool
        self.followed = followed
        self.pods: dict[str, Pod] = {}
        self.services: dict[tuple, int] = {svc: 0 for svc in SERVICES}  # existing -> generation
        self.slices: dict[str, dict] = {}  # slice uid -> obj (the API server's)
        self.src = {PODS: Source(PODS), SLICES: Source(SLICES)}
        pool._watches = {name: s for name, s in self.src.items() if name in pool.sources}  # failing, relist_when_back
        self.pods_deleted_uids: set[str] = set()  # uids the pods source told the pool were deleted
        # members an answering source let go of while the other failed: not routed until a source says them again
        self.must_out: set[Member] = set()
        self.log = log

    # -- selectors / server state ----------------------------------------------------------

    def follows(self, dep: str) -> bool:
        return self.followed is None or dep in self.followed

    def matches(self, source: str, obj: Optional[dict]) -> bool:
        if obj is None:
            return False
        labels = obj["metadata"]["labels"]
        dep = labels.get("jina_deployment_name" if source == PODS else "shardnet.io/deployment")
        return dep is not None and self.follows(dep)

    def server_state(self, source: str) -> dict[str, dict]:
        if source == PODS:
            objs = [pod_obj(uid, p) for uid, p in self.pods.items()]
        else:
            objs = list(self.slices.values())
        return {object_key(o): o for o in objs if self.matches(source, o)}

    def changed(self, source: str, old: Optional[dict], new: Optional[dict]) -> None:
        """An object changed on the API server: its watch event, as a selector-filtered watch gives it."""
        if source not in self.pool.sources:
            return
        was, now = self.matches(source, old), self.matches(source, new)
        if was and now:
            if old != new:
                self.src[source].queue.append(("MODIFIED", new))
        elif was:
            self.src[source].queue.append(("DELETED", old))
        elif now:
            self.src[source].queue.append(("ADDED", new))

    # -- truth ---------------------------------------------------------------------------------

    def truth(self) -> set[Member]:
        return {m for uid, p in self.pods.items() if self.follows(p.dep) for m in pod_members(pod_obj(uid, p))}

    def ip_free(self, ip: str, but: Optional[str] = None) -> bool:
        """No live pod (not being deleted nor ended) holds ``ip``: the CNI may give it to a new pod."""
        return not any(
            p.ip == ip and not p.deleting and p.phase == "Running" for uid, p in self.pods.items() if uid != but
        )

    def set_pod(self, uid: str, new: Optional[Pod]) -> None:
        old = pod_obj(uid, self.pods[uid]) if uid in self.pods else None
        if new is None:
            self.pods.pop(uid, None)
        else:
            self.pods[uid] = new
        self.changed(PODS, old, pod_obj(uid, new) if new is not None else None)

    def endpoints_for(self, svc) -> list[dict]:
        dep, role, shard = svc
        out = []
        for uid, p in sorted(self.pods.items(), key=lambda kv: (kv[1].ip or "", kv[0])):
            if p.dep != dep or p.role != role or (role == "WORKER" and p.shard != shard):
                continue
            if not p.ip or p.phase != "Running":
                continue
            out.append({
                "addresses": [p.ip],
                "conditions": {"ready": p.ready and not p.deleting, "serving": p.ready, "terminating": p.deleting},
                "targetRef": {"kind": "Pod", "namespace": "default", "name": p.name, "uid": uid},
            })
        return out

    def sync(self, svc, split: int) -> None:
        """The EndpointSlice controller brings ``svc``'s slices (a and b) to the pods as they are now."""
        if svc not in self.services:
            return
        gen = self.services[svc]
        eps = self.endpoints_for(svc)
        parts = {"a": [], "b": []}
        for index, ep in enumerate(eps):
            parts["b" if (split >> index) & 1 else "a"].append(ep)
        for suffix, items in parts.items():
            obj = slice_obj(svc, suffix, gen, items)
            uid = obj["metadata"]["uid"]
            old = self.slices.get(uid)
            if old is None and not items and suffix == "b":
                continue
            self.slices[uid] = obj
            self.changed(SLICES, old, obj)

    def svc_delete(self, svc) -> None:
        if svc not in self.services:
            return
        gen = self.services.pop(svc)
        for suffix in "ab":
            uid = f"{svc_name(svc)}-{suffix}-g{gen}"
            old = self.slices.pop(uid, None)
            if old is not None:
                self.changed(SLICES, old, None)

    def svc_create(self, svc, gen: int) -> None:
        if svc in self.services:
            return
        self.services[svc] = gen
        self.sync(svc, 0)

    # -- the pool's side ---------------------------------------------------------------------------

    def going(self) -> set[str]:
        """The uids the pods said are being deleted, ended or deleted (their slice endpoints are vetoed)."""
        return {
            uid for uid, o in self.src[PODS].delivered.items()
            if o["metadata"].get("deletionTimestamp") or o["status"].get("phase") in ("Failed", "Succeeded")
        } | self.pods_deleted_uids

    def word(self, source: str) -> set[Member]:
        """What ``source`` says now, as the pool reads it: a slice's endpoints vetoed by the pods' word left out."""
        if source == PODS:
            return {m for o in self.src[PODS].delivered.values() for m in pod_members(o)}
        going = self.going()
        return {
            m for o in self.src[SLICES].delivered.values() for ep in o["endpoints"]
            if ep["targetRef"]["uid"] not in going for m in slice_members({**o, "endpoints": [ep]})
        }

    def noted(self, source: str, before: set[Member], relist: bool) -> None:
        after = self.word(source)
        other = SLICES if source == PODS else PODS
        if other in self.pool.sources and self.src[other].failing:
            self.must_out |= before - after
        self.must_out -= after if relist else after - before

    async def deliver(self, source: str) -> None:
        s = self.src[source]
        if s.down or not s.queue:
            return
        before = self.word(source)
        await self._deliver(source)
        self.noted(source, before, relist=False)

    async def _deliver(self, source: str) -> None:
        await self._hand_over(source, *self.src[source].queue.pop(0))

    async def _hand_over(self, source: str, kind: str, obj: dict) -> None:
        """One watch event given to the pool, and noted as the source's last word."""
        key = object_key(obj)
        if kind == "DELETED":
            self.src[source].delivered.pop(key, None)
            if source == PODS:
                self.pods_deleted_uids.add(key)
        else:
            self.src[source].delivered[key] = obj
            if source == PODS:
                self.pods_deleted_uids.discard(key)
        await self.pool._on_event(source, kind, obj)

    async def relist(self, source: str) -> None:
        if source not in self.pool.sources:
            return
        before = self.word(source)
        routed_before = self.routing()
        had = {m.deployment for m in routed_before}
        pool = self.pool
        if isinstance(pool, CheckingPool):
            pool.emptied_in_relist.clear()
        await self._relist(source)
        self.noted(source, before, relist=True)
        if isinstance(pool, CheckingPool):
            await pool._ledger.drain()
            has = {m.deployment for m in self.routing()}
            had_shards = {(m.deployment, m.shard_id) for m in routed_before if not m.head}
            has_shards = {(m.deployment, m.shard_id) for m in self.routing() if not m.head}
            for dep in sorted(pool.emptied_in_relist & (had | had_shards) & (has | has_shards), key=str):
                what = dep if isinstance(dep, str) else f"shard {dep[1]} of {dep[0]}"
                pool.faults.append(f"R: {what} emptied while a relist of the {source} ran, routed before and after")

    async def _relist(self, source: str) -> None:
        s = self.src[source]
        state = self.server_state(source)
        s.queue.clear()
        s.failing = s.relist_wanted = False
        if source == PODS:
            self.pods_deleted_uids |= set(s.delivered) - set(state)
            self.pods_deleted_uids -= set(state)
        s.delivered = dict(state)
        await self.pool._on_list(source, list(state.values()))

    async def apply(self, action: tuple) -> None:
        kind, *args = action
        if kind == "new_pod":
            uid, dep, role, shard, ip, ready = args
            if uid in self.pods or (ip is not None and not self.ip_free(ip)):
                return
            self.set_pod(uid, Pod(f"p-{uid}", dep, role, shard, ip, ready))
        elif kind == "assign_ip":
            uid, ip = args
            p = self.pods.get(uid)
            if p is None or p.ip is not None or not self.ip_free(ip):
                return
            self.set_pod(uid, dataclasses.replace(p, ip=ip))
        elif kind == "ready":
            uid, ready = args
            if uid in self.pods:
                self.set_pod(uid, dataclasses.replace(self.pods[uid], ready=ready))
        elif kind == "relabel":
            uid, dep, role, shard = args
            if uid in self.pods:
                self.set_pod(uid, dataclasses.replace(self.pods[uid], dep=dep, role=role, shard=shard))
        elif kind == "deleting":
            (uid,) = args
            if uid in self.pods:
                self.set_pod(uid, dataclasses.replace(self.pods[uid], deleting=True))
        elif kind == "end":
            uid, phase = args
            if uid in self.pods:
                self.set_pod(uid, dataclasses.replace(self.pods[uid], phase=phase, ready=False))
        elif kind == "remove":
            (uid,) = args
            if uid in self.pods:
                self.set_pod(uid, None)
        elif kind == "sync":
            svc, split = args
            self.sync(svc, split)
        elif kind == "svc_delete":
            self.svc_delete(args[0])
        elif kind == "svc_create":
            self.svc_create(args[0], args[1])
        elif kind == "deliver":
            await self.deliver(args[0])
        elif kind == "relist":
            if not self.src[args[0]].down:
                await self.relist(args[0])
        elif kind == "down":
            s = self.src[args[0]]
            s.down = s.failing = True
        elif kind == "up":
            source, how = args
            s = self.src[source]
            if not s.down:
                return
            s.down = False
            if s.relist_wanted or how == "relist":
                await self.relist(source)
            else:
                s.failing = False
        else:
            raise ValueError(action)
        await self.pool._ledger.drain()

    async def quiesce(self, rng_seed: int, how: str) -> None:
        """Every Service synced to the pods, every source up and caught up."""
        rng = random.Random(rng_seed)
        for svc in SERVICES:
            if svc not in self.services:
                self.svc_create(svc, 100)
            self.sync(svc, rng.randrange(8))
        for source in (PODS, SLICES):
            if self.src[source].down:
                await self.apply(("up", source, how))
        if how == "relist":
            order = [PODS, SLICES] if rng.random() < 0.5 else [SLICES, PODS]
            for source in order:
                await self.apply(("relist", source))
        while self.src[PODS].queue or self.src[SLICES].queue:
            ready = [s for s in (PODS, SLICES) if self.src[s].queue]
            await self.apply(("deliver", rng.choice(ready)))

    # -- checks ----------------------------------------------------------------------------------------

    def routing(self) -> set[Member]:
        out = set()
        for dep, entry in self.pool.deployments.items():
            for address in entry["head"]:
                out.add(Member(dep, True, None, address))
            for shard, addresses in entry["shards"].items():
                for address in addresses:
                    out.add(Member(dep, False, shard, address))
        return out

    def check(self) -> list[str]:
        faults = []
        routed = self.routing()
        roles: dict[tuple[str, str], set] = {}
        for m in routed:
            roles.setdefault((m.deployment.partition("/")[0], m.address), set()).add((m.deployment, m.head, m.shard_id))
        for (dep, address), held in roles.items():
            if len(held) > 1:
                faults.append(f"1: {address} routed as {sorted(held, key=str)} of {dep}")
        pod_word = {m for o in self.src[PODS].delivered.values() for m in pod_members(o)}
        slice_word = {m for o in self.src[SLICES].delivered.values() for m in slice_members(o)}
        for m in routed - pod_word - slice_word:
            faults.append(f"2: {m} routed, said by neither source")
        ledger = self.pool._ledger
        held = {m for m, n in ledger._holders.items() if n > 0} - ledger._contested
        if routed != held:
            faults.append(f"3: routed-not-held {routed - held} held-not-routed {held - routed}")
        going = {
            uid for uid, o in self.src[PODS].delivered.items()
            if o["metadata"].get("deletionTimestamp") or o["status"].get("phase") in ("Failed", "Succeeded")
        } | self.pods_deleted_uids
        for m in routed - pod_word:
            ok = False
            for o in self.src[SLICES].delivered.values():
                for ep in o["endpoints"]:
                    if f"{ep['addresses'][0]}:{PORT}" != m.address:
                        continue
                    if ep["targetRef"]["uid"] not in going and m in slice_members({**o, "endpoints": [ep]}):
                        ok = True
            if not ok:
                faults.append(f"4: {m} routed by slice endpoints whose pods are going or gone")
        if isinstance(self.pool, CheckingPool):
            faults += self.pool.faults
            self.pool.faults = []
        for m in routed & self.must_out:
            faults.append(f"5: {m} routed, let go of by the answering source while the other failed")
        return faults

    def check_quiet(self) -> list[str]:
        routed, truth = self.routing(), self.truth()
        if routed != truth:
            return [f"Q: routed-not-true {sorted(routed - truth)} true-not-routed {sorted(truth - routed)}"]
        return []


# -- generation ------------------------------------------------------------------------------------


def random_action(rng: random.Random, model: Model, counter: list[int]) -> tuple:
    uids = sorted(model.pods)
    r = rng.random()
    if r < 0.12 or not uids:
        counter[0] += 1
        role, shard = rng.choice(ROLES)
        free = [ip for ip in IPS if model.ip_free(ip)] or IPS
        return ("new_pod", f"u{counter[0]}", rng.choice(DEPS) if rng.random() < 0.3 else "dep", role, shard,
                rng.choice(free) if rng.random() < 0.85 else None, rng.random() < 0.8)
    if r < 0.16:
        free = [ip for ip in IPS if model.ip_free(ip)] or IPS
        return ("assign_ip", rng.choice(uids), rng.choice(free))
    if r < 0.22:
        return ("ready", rng.choice(uids), rng.random() < 0.6)
    if r < 0.28:
        role, shard = rng.choice(ROLES)
        return ("relabel", rng.choice(uids), rng.choice(DEPS) if rng.random() < 0.3 else "dep", role, shard)
    if r < 0.33:
        return ("deleting", rng.choice(uids))
    if r < 0.35:
        return ("end", rng.choice(uids), rng.choice(["Failed", "Succeeded"]))
    if r < 0.42:
        going = [u for u in uids if model.pods[u].deleting or model.pods[u].phase != "Running"]
        return ("remove", rng.choice(going if going and rng.random() < 0.8 else uids))
    if r < 0.55:
        return ("sync", rng.choice(SERVICES), rng.randrange(16))
    if r < 0.57:
        return ("svc_delete", rng.choice(SERVICES))
    if r < 0.59:
        counter[0] += 1
        return ("svc_create", rng.choice(SERVICES), counter[0])
    if r < 0.85:
        return ("deliver", rng.choice([PODS, SLICES]))
    if r < 0.90:
        return ("relist", rng.choice([PODS, SLICES]))
    if r < 0.95:
        return ("down", rng.choice([PODS, SLICES]))
    return ("up", rng.choice([PODS, SLICES]), rng.choice(["resume", "relist"]))


def sources_for(seed: int) -> tuple[str, ...]:
    r = random.Random(seed * 7919 + 1).random()
    return (SLICES,) if r < 0.15 else (PODS,) if r < 0.2 else (PODS, SLICES)


async def run_actions(actions: list[tuple], followed, quiet_seed: int, how: str, initial: bool = True) -> Optional[str]:
    """Replay ``actions`` (after an initial consistent list of both sources); the first fault, or None."""
    pool = CheckingPool("default", deployments=followed, sources=sources_for(quiet_seed))
    model = Model(pool, followed)
    try:
        if initial:
            await model.relist(PODS)
            await model.relist(SLICES)
        for index, action in enumerate(actions):
            await model.apply(action)
            faults = model.check()
            if faults:
                return f"step {index} {action} :: " + " | ".join(faults)
        await model.quiesce(quiet_seed, how)
        faults = model.check() + model.check_quiet()
        if faults:
            return f"quiescence ({how}) :: " + " | ".join(faults)
        return None
    finally:
        await pool._ledger.drain()
        await pool.close()


async def generate(seed: int, steps: int) -> tuple[list[tuple], Any, int, str, Optional[str]]:
    rng = random.Random(seed)
    followed = ("dep",) if rng.random() < 0.5 else None
    how = rng.choice(["resume", "relist"])
    pool = CheckingPool("default", deployments=followed, sources=sources_for(seed))
    model = Model(pool, followed)
    counter = [0]
    actions: list[tuple] = []
    fault = None
    try:
        await model.relist(PODS)
        await model.relist(SLICES)
        for _ in range(steps):
            action = random_action(rng, model, counter)
            actions.append(action)
            await model.apply(action)
            faults = model.check()
            if faults:
                fault = ":: " + " | ".join(faults)
                break
    finally:
        await pool._ledger.drain()
        await pool.close()
    return actions, followed, seed, how, fault


def kind_of(fault: Optional[str]) -> Optional[str]:
    if fault is None:
        return None
    return fault.split(":: ", 1)[1][:1]


async def shrink(actions: list[tuple], followed, quiet_seed: int, how: str) -> tuple[list[tuple], str]:
    """ddmin-style: drop chunks, then single actions, while a fault of the same kind remains."""
    first = await run_actions(actions, followed, quiet_seed, how)
    assert first is not None
    want = kind_of(first)
    best, best_fault = list(actions), first

    def same(fault):
        if fault is None:
            return False
        return kind_of(fault) == want

    chunk = max(1, len(best) // 2)
    while chunk >= 1:
        i = 0
        progress = False
        while i < len(best):
            trial = best[:i] + best[i + chunk:]
            fault = await run_actions(trial, followed, quiet_seed, how)
            if same(fault):
                best, best_fault, progress = trial, fault, True
            else:
                i += chunk
        if not progress:
            chunk //= 2
    return best, best_fault


async def main(first: int, count: int, steps: int) -> None:
    logging.getLogger("shardnet").setLevel(logging.CRITICAL)
    logging.getLogger().setLevel(logging.CRITICAL)
    found = 0
    kinds: dict[str, int] = {}
    for seed in range(first, first + count):
        actions, followed, _, how, fault = await generate(seed, steps)
        if fault is None:
            fault = await run_actions(actions, followed, seed, how)
        if fault is None:
            continue
        found += 1
        key = kind_of(fault)
        kinds[key] = kinds.get(key, 0) + 1
        if kinds[key] <= 2:
            small, small_fault = await shrink(actions, followed, seed, how)
            print(f"seed {seed} followed={followed} how={how}: {len(actions)} -> {len(small)} actions")
            print("  fault:", small_fault)
            for action in small:
                print("   ", action)
            sys.stdout.flush()
    print(f"{count} seeds, {found} failing; by kind {kinds}")




# -- concurrent variant: the two sources' handlers interleave at their awaits, as the two watches' tasks do ----------


class ConcurrentModel(Model):
    """Deliveries and relists are handed to one task per source (as ListWatch runs its handler); the driver goes on
    changing the cluster and handing over work while they run, yielding the loop ``("yield", n)`` times."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.inbox = {PODS: asyncio.Queue(), SLICES: asyncio.Queue()}
        self.busy = {PODS: 0, SLICES: 0}
        self.errors: list[BaseException] = []
        self.tasks = [asyncio.get_running_loop().create_task(self._consume(s)) for s in (PODS, SLICES)]

    async def _consume(self, source: str) -> None:
        while True:
            work = await self.inbox[source].get()
            try:
                await work()
            except asyncio.CancelledError:  # close(): the task ends (caught below, it waited on get() for ever)
                raise
            except BaseException as error:  # noqa: BLE001 - reported as a fault
                self.errors.append(error)
            finally:
                self.busy[source] -= 1

    def hand(self, source: str, work) -> None:
        self.busy[source] += 1
        self.inbox[source].put_nowait(work)

    async def apply(self, action: tuple) -> None:
        kind, *args = action
        if kind == "yield":
            for _ in range(args[0]):
                await asyncio.sleep(0)
            return
        if kind == "settle":
            await self.settle()
            return
        if kind == "deliver":
            source = args[0]
            s = self.src[source]
            if s.down or not s.queue:
                return
            event = s.queue.pop(0)  # it leaves the stream now: a later relist must not find it queued

            async def work(source=source, event=event):
                await self._hand_over(source, *event)
            self.hand(source, work)
            return
        if kind in ("relist", "up") and args[0] not in self.pool.sources:
            return
        if kind == "relist" or (kind == "up" and self.src[args[0]].down):
            source = args[0]
            s = self.src[source]
            if kind == "relist" and s.down:
                return
            if kind == "up":
                s.down = False
                if not (s.relist_wanted or args[1] == "relist"):
                    s.failing = False
                    return
            state = self.server_state(source)
            s.queue.clear()
            s.failing = s.relist_wanted = False

            async def work(source=source, state=state):
                s2 = self.src[source]
                if source == PODS:
                    self.pods_deleted_uids |= set(s2.delivered) - set(state)
                    self.pods_deleted_uids -= set(state)
                s2.delivered = dict(state)
                await self.pool._on_list(source, list(state.values()))
            self.hand(source, work)
            return
        if kind == "up":
            return
        await Model.apply(self, action)

    async def settle(self) -> None:
        while any(self.busy.values()):
            await asyncio.sleep(0)
        await self.pool._ledger.drain()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def check_now(self) -> list[str]:
        """What must hold at any await: no address as two roles of a deployment; no handler crashed."""
        faults = [f for f in self.check() if f.startswith("1:")]
        return faults + [f"E: handler raised {error!r}" for error in self.errors]

    async def quiesce(self, rng_seed: int, how: str) -> None:
        await self.settle()
        rng = random.Random(rng_seed)
        for svc in SERVICES:
            if svc not in self.services:
                self.svc_create(svc, 100)
            self.sync(svc, rng.randrange(8))
        for source in (PODS, SLICES):
            if self.src[source].down:
                await self.apply(("up", source, how))
        if how == "relist":
            for source in [PODS, SLICES] if rng.random() < 0.5 else [SLICES, PODS]:
                await self.apply(("relist", source))
        while self.src[PODS].queue or self.src[SLICES].queue:
            await self.apply(("deliver", rng.choice([s for s in (PODS, SLICES) if self.src[s].queue])))
            await self.apply(("yield", rng.randrange(3)))
        await self.settle()


def random_concurrent_action(rng: random.Random, model: Model, counter: list[int]) -> tuple:
    r = rng.random()
    if r < 0.25:
        return ("yield", rng.randrange(1, 4))
    if r < 0.30:
        return ("settle",)
    return random_action(rng, model, counter)


async def run_concurrent(actions: list[tuple], followed, quiet_seed: int, how: str) -> Optional[str]:
    pool = K8sGrpcConnectionPool("default", deployments=followed, sources=sources_for(quiet_seed))
    model = ConcurrentModel(pool, followed)
    try:
        await Model.relist(model, PODS)
        await Model.relist(model, SLICES)
        for index, action in enumerate(actions):
            await model.apply(action)
            faults = model.check() if action == ("settle",) else model.check_now()
            if faults:
                return f"step {index} {action} :: " + " | ".join(faults)
        await model.quiesce(quiet_seed, how)
        faults = model.check() + model.check_quiet() + model.check_now()
        if faults:
            return f"quiescence ({how}) :: " + " | ".join(faults)
        return None
    finally:
        await model.close()
        await pool._ledger.drain()
        await pool.close()


async def main_concurrent(first: int, count: int, steps: int) -> None:
    logging.getLogger("shardnet").setLevel(logging.CRITICAL)
    found, kinds = 0, {}
    for seed in range(first, first + count):
        rng = random.Random(seed)
        followed = ("dep",) if rng.random() < 0.5 else None
        how = rng.choice(["resume", "relist"])
        # generated against a sequential model of the cluster (the actions only read the pods' names)
        shadow = Model(K8sGrpcConnectionPool("default", deployments=followed), followed)
        counter, actions = [0], []
        for _ in range(steps):
            action = random_concurrent_action(rng, shadow, counter)
            actions.append(action)
            if action[0] in ("new_pod", "assign_ip", "ready", "relabel", "deleting", "end", "remove"):
                await shadow.apply(action)
        await shadow.pool.close()
        fault = await run_concurrent(actions, followed, seed, how)
        if fault is None:
            continue
        found += 1
        key = kind_of(fault)
        kinds[key] = kinds.get(key, 0) + 1
        if kinds[key] <= 2:
            best = list(actions)
            chunk = max(1, len(best) // 2)
            while chunk >= 1:
                i, progress = 0, False
                while i < len(best):
                    trial = best[:i] + best[i + chunk:]
                    got = await run_concurrent(trial, followed, seed, how)
                    if got is not None and kind_of(got) == key:
                        best, fault, progress = trial, got, True
                    else:
                        i += chunk
                if not progress:
                    chunk //= 2
            print(f"seed {seed} followed={followed} how={how}: {len(actions)} -> {len(best)} actions")
            print("  fault:", fault)
            for action in best:
                print("   ", action)
            sys.stdout.flush()
    print(f"concurrent: {count} seeds, {found} failing; by kind {kinds}")


if __name__ == "__main__":
    concurrent = "--concurrent" in sys.argv
    args = [int(a) for a in sys.argv[1:] if a != "--concurrent"]
    first, count, steps = (args + [0, 200, 150][len(args):])[:3]
    asyncio.run((main_concurrent if concurrent else main)(first, count, steps))
