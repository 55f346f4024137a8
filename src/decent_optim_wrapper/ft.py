"""Gossip over a torchft ``Manager``: training goes on when a replica dies, with no restart of the others.

``DecentOptimWrapper(optimizer, topology=..., manager=manager)`` builds a :class:`ManagedDecentOptimWrapper`. Each
replica is one process with a ``torchft.Manager`` of its own (``world_size=1``); the lighthouse holds the
membership. Every ``step()``:

1. **Ends the round in flight** (launched by the previous step): waits for the peer's values, then the two
   members swap a one-byte verdict, "I have everything and I am sound". The round is applied only where both
   verdicts say yes, so a pair applies it on both sides or on neither (see *Failures* below).
2. **Joins the quorum** (``manager.start_quorum()``, synchronous): the members of the quorum are the world the
   topology's schedule is built for, numbered by their replica rank. A replica that is behind heals inside this
   call: it receives parameters, inner-optimizer state and the round counter from a live peer through the
   manager's checkpoint transport, and skips its local update in this step (its gradient was taken at the
   parameters it had before). When the quorum changed, the members agree on the round counter (an all-reduce
   MAX over the new process group, which is also the barrier that lets a healing replica finish reading its
   checkpoint before its source moves on).
3. **Takes the local step** if ``manager.should_commit()`` says so.
4. **Launches the next round** (non-blocking) over the manager's process group: the pair swaps snapshots of
   its buckets point to point.

**Failures.** A replica killed mid-training (SIGKILL, a host lost) leaves its peer's round failing: at once when
the connection's close reaches the peer, else when the peer's liveness probe is refused (below), else at
``timeout``; the survivor drops the round: its parameters stay as they were, so the mean over the survivors is
not moved by the dead replica. The next quorum forms without it once the lighthouse misses its heartbeats
(``--heartbeat_timeout_ms``, 5 s by default), and the schedule is rebuilt for the survivors. A round's verdicts
are swapped only after both transfers completed, so a survivor never applies a round its peer did not receive in
full. Precisely, with ``lr = 0``: the mean of the survivors' parameters after training equals their mean right
after the last round the dead replica took part in (pair averaging keeps every pair's sum; a round the dead
replica did not confirm is applied by nobody).

**Liveness.** TCP tells a receiver that its peer died only if the close (FIN/RST) arrives; on a congested link it
can be dropped, and a receiver with nothing to send then waits for data that never comes (seen on the emulated
cluster: a survivor waited out its 30 s timeout, missed the next quorum and had to heal, losing its own state).
So each replica listens on a small TCP port of its own (a thread accepts and closes), the members swap these
addresses at every membership change, and a wait for a round that lasts more than 0.2 s connects to the peer's
port every 0.2 s: a refused connection means the peer's process is gone and the round is dropped at once. An
unanswered one (a host that lost power) means nothing, and the wait goes on until ``timeout``. A live peer, even
a stopped or slow one, always accepts, so the probe never drops a round that a live peer may apply.

**Membership changes** reset nothing but the schedule: the round counter goes on (agreed at every change), no
round is in flight at a quorum (each is ended before), and there is no compression state to warm-start (low-rank
gossip is not offered here). A replica that joins enters with a copy of its source's parameters, which moves the
mean of the members towards the source's by ``(x_source - mean) / n``.

**What is gloo-only.** Point-to-point messages carry tags (one range per round) that gloo keeps apart, so a late
message of a dropped round can never be read as another round's. NCCL ignores tags and matches messages by
order; there, the order is the same on both members of a pair (one round at a time, data then verdict), and a
dropped round is one whose peer died, so nothing is left to match.

torchft is imported by nothing else in the package: without a manager, nothing here runs.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any
from urllib.parse import urlparse

import torch
import torch.distributed as dist
from loguru import logger
from torch.distributed.distributed_c10d import AllgatherOptions, AllreduceOptions
from torch.optim import Optimizer

from .buckets import build_buckets, check_params
from .comm import GossipError
from .config import GossipConfig
from .gossip import CommStats, Gossip
from .mixing import compressed_pair_mix_, pair_mix_sent_, quantize
from .topo import Group, Schedule, Topology
from .wrapper import _STATE_KEY, DecentOptimWrapper, _check_optimizer, _config, _make_topology, squared_distance

__all__ = ["ManagedDecentOptimWrapper", "FTStats"]

# Tags of a round's messages: far above the counter gloo's collectives take their tags from (it restarts with
# every process group the manager configures), one range per round so that a late message of a dropped round
# is never read as another round's. gloo-only: NCCL matches by order (see the module docstring).
_TAG_BASE = 1 << 28
_TAG_ROUNDS = 1 << 12
_TAG_STRIDE = 1 << 12  # messages per round: one per bucket, then the verdict
_MANAGER_KEY = "decent_optim_wrapper"
# How long a wait for a round goes before it asks whether the peer still lives, and how often after that.
_PROBE_AFTER_S = 0.2
_HOST_BYTES = 64  # a member's address as it travels in the membership exchange (IPv6 fits)


@dataclass(frozen=True)
class FTStats:
    """What membership did to this replica so far: ``applied`` and ``dropped`` rounds (a dropped round: the peer
    died, failed or said no), ``quorums`` (membership changes seen, the first one included) and ``heals``
    (times this replica took its state from a peer)."""

    applied: int = 0
    dropped: int = 0
    quorums: int = 0
    heals: int = 0


@dataclass
class _Round:
    """A launched round: the peer, the weight, the buffers (``sent``: snapshots or rounded values, ``got``: the
    peer's), the works, and whether this replica vouches for what it sent."""

    index: int
    peer: int
    self_weight: float
    sent: list[torch.Tensor]
    got: list[torch.Tensor]
    works: list[Any]
    sound: bool
    ids: list[int] = field(default_factory=list)


class ManagedDecentOptimWrapper(DecentOptimWrapper):
    """:class:`~decent_optim_wrapper.DecentOptimWrapper` over a torchft ``Manager``'s live membership.

    Built by ``DecentOptimWrapper(optimizer, topology=..., manager=manager)``; see the module docstring for what
    a step does and what a failure does. The manager must be made with ``use_async_quorum=False`` (as torchft's
    DiLoCo requires) and ``world_size=1`` (one process per replica). The wrapper registers its state with the
    manager (``"decent_optim_wrapper"``: parameters, the inner optimizer's state, the round counter), so a
    joining replica heals with no state function of the user's; register buffers (BatchNorm statistics) yourself.

    Arguments as for ``DecentOptimWrapper``; ``rank``, ``world_size``, ``process_group`` come from the quorum and
    must be left out; ``timeout`` defaults to the manager's; ``compression``, ``max_delay`` and ``gossip_every``
    are not offered with a manager (``ValueError``). The topology's groups must be pairs (``ring``,
    ``one-peer-exp``, ``torus``, ``alternating-exp-ring``): a group of three cannot make "all or none" exact
    when one of them dies.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        rank: int | None = None,
        world_size: int | None = None,
        local_world_size: int | None = None,
        topology: Any = "ring",
        bucket_cap_mb: float = 25,
        *,
        manager: Any = None,
        timeout: float | timedelta | None = None,
        process_group: dist.ProcessGroup | None = None,
        config: GossipConfig | None = None,
        **options: Any,
    ) -> None:
        self._init_optimizer_hooks()
        self._join_work = None
        for name, value in (("rank", rank), ("world_size", world_size), ("process_group", process_group)):
            if value is not None:
                raise ValueError(f"Invalid {name}={value!r} with a manager: the quorum gives rank and world size, "
                                 "and rounds run over the manager's process group. Leave it out.")
        _check_manager(manager)
        _check_optimizer(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        check_params(params)
        if not isinstance(topology, str) and not isinstance(topology, type) or config is not None and not (
                isinstance(config.topology, (str, type))):
            raise ValueError("Invalid topology: with a manager give a registered name or a Topology subclass; the "
                             "wrapper builds it for each quorum's members.")
        given = {"topology": topology, "local_world_size": local_world_size, "bucket_cap_mb": bucket_cap_mb,
                 "timeout": timeout, **options}
        cfg = _config(config, given)
        if timeout is None and config is None:
            cfg = replace(cfg, timeout=manager._timeout)  # the manager's, as torchft's own collectives wait
        for name, default in (("compression", None), ("max_delay", 1), ("gossip_every", 1), ("check_finite", False)):
            if getattr(cfg, name) != default:
                raise ValueError(f"Invalid {name}={getattr(cfg, name)!r} with a manager: not offered with a torchft "
                                 f"Manager; leave it at {default!r}.")
        self._optimizer, self._config, self._manager = optimizer, cfg, manager
        self._timeout = cfg.timeout_delta
        self._local_world_size = 1
        self._bucket_cap_mb = cfg.bucket_cap_mb
        self._check_finite = False
        self._pg_ref = None  # type: ignore[assignment]  # rounds run over the manager's process group
        for n in range(2, 9):  # refuse a topology of larger groups now, not at the first membership change
            _pair_topology(cfg, 0, n)
        self._topology, self._schedule = _pair_topology(cfg, 0, 1)
        self._rank, self._world_size = 0, 1  # until the first quorum
        self._buckets = build_buckets(params, cfg.bucket_cap_mb, lambda p: False)
        self._gossip = Gossip.alone(self._schedule, self._buckets, cfg)  # only for what the facade shares
        self._round = 0  # the next round launched (agreed at every membership change)
        self._quorum_id: int | None = None
        self._inflight: _Round | None = None
        self._healed = False
        self._held = False  # between global_avg(may_revert=True) and its revert
        self._held_extras: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor, its value before global_avg)
        self._dropping = False  # global_avg(may_revert=False) ran: the next step drops the round in flight
        self._stats = CommStats()
        self._ft_stats = FTStats()
        self._buffers: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}
        self._liveness = _Liveness(_advertised_host(manager))
        self._addresses: list[tuple[str, int]] = []  # each member's liveness address, by quorum rank
        manager.register_state_dict_fn(_MANAGER_KEY, self._load_healed, self._heal_state)
        logger.debug("managed gossip: topology {}, {} bucket(s)", cfg.topology, len(self._buckets))

    # ------------------------------------------------------------------ facade
    @property
    def manager(self) -> Any:
        """The torchft ``Manager``."""
        return self._manager

    @property
    def round(self) -> int:
        """Rounds launched so far by the members (agreed at every membership change)."""
        return self._round

    @property
    def comm_stats(self) -> CommStats:
        return self._stats

    @property
    def ft_stats(self) -> FTStats:
        """Rounds applied and dropped, membership changes and heals seen by this replica."""
        return self._ft_stats

    def __repr__(self) -> str:
        return (f"DecentOptimWrapper(manager=..., rank={self._rank}, world_size={self._world_size}, "
                f"topology={self.topology.name!r}, optimizer={self._optimizer!r})")

    # ------------------------------------------------------------------ training
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """End the round in flight, join the quorum (healing if behind), take the local step if the manager
        commits, launch the next round. With ``GradScaler``, gradients with inf/NaN skip only the local update:
        the replica still ends and launches its rounds, as every member must."""
        self._check_views()
        self._end_round_after_global_avg()
        self._join_quorum()
        commit = bool(self._manager.should_commit())
        loss = None
        if commit and not self._healed:
            found_inf = getattr(self, "found_inf", None)  # set by torch.amp.GradScaler.step(wrapper)
            if found_inf is not None:
                self._amp_inner_step(getattr(self, "grad_scale", None), found_inf)
            else:
                loss = self._optimizer.step() if closure is None else self._optimizer.step(closure)
        else:
            logger.debug("replica {}: local update skipped ({})", self._rank,
                         "healed in this step" if commit else "the manager did not commit")
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
        self._healed = False
        self._launch(sound=commit)
        return loss

    def finish(self) -> None:
        """End the round in flight now (applied or dropped as in a step). Not a barrier: under a manager the
        members leave when they are done, and a peer that left has already confirmed the last round."""
        self._check_views()
        self._end_round_after_global_avg()

    def _end_round_after_global_avg(self) -> None:
        """End the round in flight; after a ``global_avg()`` with no revert, drop it (training goes on from the
        average: see :meth:`global_avg`), and forget what that call kept."""
        drop = self._dropping or self._held
        self._held, self._held_extras, self._dropping = False, [], False
        self._end_round(apply=not drop)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise NotImplementedError("add_param_group() is not offered with a manager: build the optimizer with every "
                                  "parameter group (frozen ones included) before wrapping it.")

    def reduce_metrics(self, metrics: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError("reduce_metrics() is not offered with a manager.")

    def join_hook(self, **kwargs: Any) -> Any:
        raise NotImplementedError("Join is not offered with a manager: a replica that runs out of data leaves, and "
                                  "the next quorum forms without it.")

    # ------------------------------------------------------------------ rounds
    def _buffer(self, i: int, slot: int, dtype: torch.dtype) -> torch.Tensor:
        key = (i, slot, dtype)
        buf = self._buffers.get(key)
        if buf is None:
            flat = self._buckets[i].flat
            buf = self._buffers[key] = torch.empty(flat.numel(), dtype=dtype, device=flat.device)
        return buf

    @torch.no_grad()
    def _launch(self, sound: bool) -> None:
        """Start this step's round (non-blocking): snapshot each bucket and swap it with the peer."""
        index = self._round
        self._round += 1
        if self._world_size == 1 or self._manager.participating_rank() is None:
            return
        group = self._schedule.group(self._rank, index)
        if group.size == 1:
            return
        peer = next(r for r in group.ranks if r != self._rank)
        ids = [i for i, b in enumerate(self._buckets) if not b.frozen]
        wire = self._config.wire_dtype
        sent, got, works = [], [], []
        pg = self._manager._pg
        tag = _tag(index)
        for j, i in enumerate(ids):
            flat = self._buckets[i].flat
            dtype = wire if wire is not None else flat.dtype
            out, into = self._buffer(i, 1, dtype), self._buffer(i, 0, dtype)
            if wire is None:
                out.copy_(flat)
            else:
                quantize(flat, out)
            try:
                works.append(pg.recv([into], peer, tag + j))
                works.append(pg.send([out], peer, tag + j))
            except (RuntimeError, AssertionError) as exc:  # the group is broken: the round is dropped at its end
                logger.debug("replica {}: round {} could not start with replica {}: {}", self._rank, index, peer, exc)
                sound = False
                break
            sent.append(out)
            got.append(into)
            self._stats = replace(self._stats, bytes_sent=self._stats.bytes_sent + out.numel() * out.element_size())
        self._stats = replace(self._stats, rounds=self._stats.rounds + 1)
        self._inflight = _Round(index, peer, group.self_weight, sent, got, works, sound, ids)

    @torch.no_grad()
    def _end_round(self, apply: bool = True) -> None:
        """Wait for the round in flight, swap verdicts with the peer, apply it where both say yes."""
        pending, self._inflight = self._inflight, None
        if pending is None:
            return
        pg = self._manager._pg
        timeout = self._timeout
        ok = pending.sound and apply  # a launch that could not post every bucket is not sound
        deadline = time.monotonic() + timeout.total_seconds()
        gone = False
        try:
            self._wait(pending.works, pending.peer, deadline)
        except RuntimeError as exc:
            logger.debug("replica {}: round {} with replica {} failed: {}", self._rank, pending.index, pending.peer,
                         exc)
            ok, gone = False, isinstance(exc, _PeerGone)
        verdict, theirs = torch.tensor([int(ok)], dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8)
        tag = _tag(pending.index) + _TAG_STRIDE - 1
        try:
            if gone:  # nobody to hear the verdict from
                raise _PeerGone(f"replica {pending.peer} is gone")
            works = [pg.recv([theirs], pending.peer, tag), pg.send([verdict], pending.peer, tag)]
            self._wait(works, pending.peer, max(deadline, time.monotonic() + _PROBE_AFTER_S))
        except (RuntimeError, AssertionError) as exc:
            logger.debug("replica {}: no verdict from replica {} for round {}: {}", self._rank, pending.peer,
                         pending.index, exc)
            theirs.zero_()
        if ok and int(theirs.item()) == 1:
            wire = self._config.wire_dtype
            for i, sent, got in zip(pending.ids, pending.sent, pending.got):
                flat = self._buckets[i].flat
                if wire is None:
                    pair_mix_sent_(flat, sent, got, pending.self_weight)
                else:
                    compressed_pair_mix_(flat, sent, got, 1.0 - pending.self_weight)
            self._ft_stats = replace(self._ft_stats, applied=self._ft_stats.applied + 1)
        else:
            logger.debug("replica {}: round {} with replica {} dropped (this side {}, theirs {})", self._rank,
                         pending.index, pending.peer, ok, int(theirs.item()))
            self._ft_stats = replace(self._ft_stats, dropped=self._ft_stats.dropped + 1)

    def _wait(self, works: list[Any], peer: int, deadline: float) -> None:
        """Wait for ``works`` until ``deadline`` (``time.monotonic()``); ``RuntimeError`` if one failed, the time
        is up, or ``peer``'s process is gone (its liveness port refuses: see the module docstring).

        The works are waited for on a thread of their own while this one probes the peer: gloo's point-to-point
        works cannot be polled (``is_completed()`` is not reliable for them) nor waited for in slices (a timed-out
        wait closes the connection). A wait left behind ends when gloo gives up on the dead peer, or when the next
        quorum reconfigures the process group.
        """
        done, failed = threading.Event(), []

        def wait_all() -> None:
            try:
                for w in works:
                    w.wait(timedelta(seconds=max(0.001, deadline - time.monotonic())))
            except BaseException as exc:  # noqa: BLE001  (handed to the waiting thread)
                failed.append(exc)
            finally:
                done.set()

        threading.Thread(target=wait_all, name="decent-optim-wrapper-round", daemon=True).start()
        while not done.wait(_PROBE_AFTER_S):
            if time.monotonic() > deadline:
                raise RuntimeError(f"not complete within {self._timeout.total_seconds():g} s")
            if peer < len(self._addresses) and _Liveness.gone(*self._addresses[peer]):
                raise _PeerGone(f"replica {peer}'s process is gone (its liveness port refused)")
        if failed:
            raise RuntimeError(str(failed[0])) from failed[0]

    # ------------------------------------------------------------------ membership
    def _join_quorum(self) -> None:
        """Join this step's quorum; on a membership change rebuild the schedule and agree on the round counter.

        A quorum that fails (the lighthouse restarted; a member died while the process group was reconfigured, while
        a joiner healed, or while the round counter was agreed) is asked for again until ``timeout`` has passed since
        the first failure; then :class:`GossipError`.
        """
        manager = self._manager
        deadline: float | None = None
        while True:
            try:
                manager.start_quorum()
                error = manager.errored()  # torchft keeps going when reconfiguring or healing failed; we may not
                if error is not None:
                    raise RuntimeError(f"the quorum failed: {error}")
                quorum_id, rank = manager._quorum_id, manager.participating_rank()
                if quorum_id == self._quorum_id or rank is None:
                    return
                n = manager.num_participants()
                self._round, self._addresses = self._exchange_membership(n)
            # What torchft's RPCs and collectives raise; AssertionError: its process group after a failed reconfigure
            except (RuntimeError, TimeoutError, OSError, AssertionError) as exc:
                now = time.monotonic()
                deadline = deadline if deadline is not None else now + self._timeout.total_seconds()
                if now > deadline:
                    raise GossipError(f"replica {self._rank}: no quorum within {self._timeout.total_seconds():g} s "
                                      f"(is the lighthouse up?). Last error: {exc!r}") from exc
                logger.debug("replica {}: quorum failed ({!r}); asking again", self._rank, exc)
                # A failed quorum stays in the manager and start_quorum() would raise it again and again.
                manager._quorum_future = None
                continue
            self._quorum_id, self._rank, self._world_size = quorum_id, rank, n
            self._topology, self._schedule = _pair_topology(self._config, rank, n)
            self._ft_stats = replace(self._ft_stats, quorums=self._ft_stats.quorums + 1)
            logger.debug("replica {}/{}: quorum {}, round {}", rank, n, quorum_id, self._round)
            return

    def _exchange_membership(self, n: int) -> tuple[int, list[tuple[str, int]]]:
        """Every member's round counter and liveness address; the round all go on from is the largest."""
        host, port = self._liveness.address
        raw = host.encode()[:_HOST_BYTES]
        mine = torch.zeros(16 + _HOST_BYTES, dtype=torch.uint8)
        mine[:16] = torch.tensor([self._round, port], dtype=torch.int64).view(torch.uint8)
        mine[16:16 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        out = [torch.empty_like(mine) for _ in range(n)]
        self._manager._pg.allgather([out], [mine], AllgatherOptions()).wait(self._timeout)
        heads = [t[:16].view(torch.int64).tolist() for t in out]  # [round, port] of each member
        addresses = [(bytes(t[16:].tolist()).rstrip(b"\0").decode(), p) for t, (_, p) in zip(out, heads)]
        return max(r for r, _ in heads), addresses

    def _heal_state(self) -> dict[str, Any]:
        """What a joining replica receives: called by the manager inside the source's quorum, when nothing is in
        flight and the parameters are still (the source takes no step until the joiner has read them)."""
        return {"buckets": [b.flat for b in self._buckets], "optimizer": self._optimizer.state_dict(),
                "round": self._round}

    @torch.no_grad()
    def _load_healed(self, state: dict[str, Any]) -> None:
        for b, t in zip(self._buckets, state["buckets"]):
            b.flat.copy_(t)
        self._optimizer.load_state_dict(state["optimizer"])
        self._round = int(state["round"])
        self._healed = True
        self._inflight = None
        self._ft_stats = replace(self._ft_stats, heals=self._ft_stats.heals + 1)
        logger.debug("replica healed from a peer at round {}", self._round)

    # ------------------------------------------------------------------ global averaging
    def _allreduce_mean(self, tensors: list[torch.Tensor], what: str) -> None:
        pg, n = self._manager._pg, self._world_size
        opts = AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        try:
            for t in tensors:
                pg.allreduce([t], opts).wait(self._timeout)
                t.div_(n)
        except RuntimeError as exc:
            raise GossipError(f"replica {self._rank}: a replica failed during {what}: {exc}") from exc

    @torch.no_grad()
    def global_avg(self, may_revert: bool = True, module: torch.nn.Module | None = None, *,
                   will_revert: bool | None = None) -> None:
        """Replace the parameters (and ``module``'s floating-point buffers) by their mean over the members of the
        current quorum. The round in flight is left in flight (a revert lets the next step end it as usual).

        If a member fails during it, every survivor that sees the failure puts its own values back and raises
        :class:`~decent_optim_wrapper.GossipError`; training can go on with ``step()``. A survivor that completed
        has the average of all members, the dead one included; with ``may_revert=True`` its revert restores it,
        so the training state is the same either way.
        """
        if will_revert is not None:
            may_revert = will_revert
        self._check_views()
        extras = [t for t in module.buffers() if t.is_floating_point()] if module is not None else []
        flats = [b.flat for b in self._buckets if not b.frozen] + extras
        backup = [t.clone() for t in flats]
        if self._world_size > 1:
            try:
                self._allreduce_mean(flats, "global_avg()")
            except GossipError:
                for t, saved in zip(flats, backup):
                    t.copy_(saved)
                raise
        # Kept for a revert; without one, the next step drops the round in flight on both sides of each pair
        # (every member made this call), and training goes on from the average.
        self._held = may_revert
        self._held_extras = list(zip(flats, backup)) if may_revert else []
        self._dropping = not may_revert

    @torch.no_grad()
    def revert_global_avg(self) -> None:
        """Undo :meth:`global_avg`: put back the parameters and buffers it replaced; the round in flight stays in
        flight, so training goes on as if the call never happened."""
        if not self._held:
            raise RuntimeError("revert_global_avg() without a global_avg(may_revert=True) before it.")
        for t, saved in self._held_extras:
            t.copy_(saved)
        self._held, self._held_extras = False, []

    @torch.no_grad()
    def consensus_distance(self) -> float:
        """``sqrt(mean_i ||x_i - mean_j x_j||^2)`` over the members of the current quorum."""
        if self._world_size == 1:
            return 0.0
        flats = [b.flat for b in self._buckets if not b.frozen]
        means = [f.clone() for f in flats]
        self._allreduce_mean(means, "consensus_distance()")
        sq = torch.tensor([squared_distance(flats, means)], dtype=torch.float64)
        self._allreduce_mean([sq], "consensus_distance()")
        return math.sqrt(float(sq.item()))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus the round counter (no round is saved in flight: call
        :meth:`finish` first to keep the last one)."""
        sd = self._optimizer.state_dict()
        sd[_STATE_KEY] = {"round": self._round, "managed": True}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict):
            raise ValueError(f"Invalid state_dict of type {type(state_dict).__name__}. Must be a dict from "
                             "state_dict().")
        state_dict = dict(state_dict)
        own = state_dict.pop(_STATE_KEY, None)
        r = own.get("round") if isinstance(own, dict) else None
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"Invalid state_dict[{_STATE_KEY!r}]: must hold the round counter state_dict() wrote.")
        self._optimizer.load_state_dict(state_dict)
        self._round, self._inflight = r, None


def _tag(index: int) -> int:
    """The first tag of round ``index``'s messages (its buckets', then its verdict's at the end of the range)."""
    return _TAG_BASE + (index % _TAG_ROUNDS) * _TAG_STRIDE


class _PeerGone(RuntimeError):
    """The peer's process is gone: its liveness port refused a connection."""


class _Liveness:
    """A TCP port that says "this process lives": a daemon thread accepts connections and closes them."""

    def __init__(self, host: str) -> None:
        self._sock = socket.create_server(("", 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.address = (host, self._sock.getsockname()[1])
        threading.Thread(target=self._serve, name="decent-optim-wrapper-liveness", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            conn.close()

    @staticmethod
    def gone(host: str, port: int) -> bool:
        """True only if the peer's host answered that nothing listens there any more (connection refused)."""
        try:
            with socket.create_connection((host, port), timeout=_PROBE_AFTER_S):
                return False
        except ConnectionRefusedError:
            return True
        except OSError:  # no answer (a lost host, a full link): unknown, so not gone
            return False


def _advertised_host(manager: Any) -> str:
    """The address the other replicas reach this one at: the one its manager server advertises."""
    server = getattr(manager, "_manager", None)
    host = urlparse(server.address()).hostname if server is not None else None
    return host or socket.gethostname()


def _check_manager(manager: Any) -> None:
    """``ValueError`` unless ``manager`` is a torchft ``Manager`` this wrapper can run over."""
    if not all(hasattr(manager, a) for a in ("start_quorum", "should_commit", "register_state_dict_fn")):
        raise ValueError(f"Invalid manager={manager!r}. Must be a torchft.Manager.")
    # Read from the manager's private fields (torchft 0.2 has no public accessor for them; the extra pins <0.3).
    if getattr(manager, "_use_async_quorum", False):
        raise ValueError("Invalid manager: made with use_async_quorum=True. Gossip needs the quorum before a round "
                         "starts (as torchft's DiLoCo does): make it with use_async_quorum=False.")
    if getattr(manager, "_group_world_size", 1) != 1:
        raise ValueError(f"Invalid manager: a replica group of {manager._group_world_size} ranks. Each replica must be "
                         "one process (Manager(..., rank=0, world_size=1)).")


def _pair_topology(cfg: GossipConfig, rank: int, n: int) -> tuple[Topology, Schedule]:
    """The topology for ``rank`` of ``n`` members and its schedule, checked to use groups of at most two."""
    topology = _make_topology(cfg.topology, rank, n, 1)
    schedule = topology.schedule()
    for t in range(schedule.period):
        for r in range(n):
            group: Group = schedule.group(r, t)
            if group.size > 2:
                raise ValueError(f"Invalid topology={cfg.topology!r} with a manager: with {n} members it averages "
                                 f"groups of {group.size}. Under a manager a round must be a pair (ring, "
                                 "one-peer-exp, torus, alternating-exp-ring), so that a member's death drops it on "
                                 "both sides or neither.")
    return topology, schedule
