"""The lock on a registered model's aliases, across processes, containers and machines.

MLflow has no compare-and-set on aliases, but creating a registered model is atomic and unique by
name, so the lock is a registered model ``<name>.daybreak-lock`` that exists while held. Three
rules keep it safe:

* **A lease.** The holder renews it every third of ``lease_s``. Others take the lock over only
  once the lease ran out (plus a grace for clock skew between hosts), or at once when they can
  prove the holder is gone.
* **Proof of death that survives PID namespaces.** The holder is recorded as boot id, PID
  namespace, PID and process start time. Only a process in the same boot and the same PID
  namespace can see whether that process still exists; a host name and a PID prove nothing (two
  containers with host networking share the host name, and their PIDs overlap).
* **One reaper per stale holder.** Deleting a registered model is not conditional, so two
  processes that both judged a lock stale could each delete it, the second one deleting the lock
  the first had just taken. A reaper first creates ``<lock>.reap-<holder>`` (atomic, unique); only
  the one that created it checks the lock still belongs to that holder and deletes it. Holder
  tokens are never reused, so no new lock can carry the stale holder's token.

And a **fence**: the holder writes aliases through :meth:`Held.set_alias` and friends, which check
before every write that the lock is still its own and its lease still valid by its own clock;
a holder that lost the lock (a long pause, a partition) raises instead of writing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from daybreak.infra.errors import PromotionConflict
from daybreak.infra.records import Tag

log = logging.getLogger(__name__)

OWNER_TAG = Tag.LOCK_OWNER
EXPIRES_TAG = Tag.LOCK_EXPIRES
HOLDER_TAG = Tag.LOCK_HOLDER  # boot id / PID namespace / PID / start time
REAP_UNTIL_TAG = Tag.REAP_UNTIL  # a reap marker's lease, by its reaper's clock
# On the lock and reap markers: what they are, for listings to leave them out. MLflow cannot hide
# a registered model from its UI or from search_registered_models (its one exception is the
# reserved ``mlflow.prompt.is_prompt`` tag, which makes the model a prompt: shown on the Prompts
# page and read by the prompt APIs), and a tag filter cannot exclude (``tags.k != 'v'`` matches
# only models that have the tag). So they are tagged and described; ``registry.registered_models``
# leaves them out of daybreak's own listings.
INTERNAL_TAG = Tag.INTERNAL
LOCK_DESCRIPTION = ("daybreak internal lock, do not delete: held while daybreak registers a version of {name} or "
                    "moves its aliases, removed when that is done (one left behind by a stopped run is removed "
                    "by the next run once its lease, tag daybreak.lock_expires, has run out)")
REAP_DESCRIPTION = ("daybreak internal lock, do not delete: marks the removal of a stale lock on {name} by one "
                    "run (removed when that is done)")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # the command may hold spaces and parentheses


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def holder_identity(pid: int | None = None) -> str:
    """Who holds a lock, as only a process in the same boot and PID namespace can check: empty
    where /proc does not say (then takeover waits for the lease)."""
    pid = os.getpid() if pid is None else pid
    boot, ns, started = _read("/proc/sys/kernel/random/boot_id"), _pid_namespace(), _start_time(pid)
    return "/".join([boot, ns, str(pid), started]) if boot and ns and started else ""


def holder_gone(identity: str) -> bool:
    """Whether the holder recorded as `identity` is provably gone: it ran in this boot and this
    PID namespace, and its PID is free or now belongs to a process started at another time."""
    parts = identity.split("/") if identity else []
    if len(parts) != 4 or not parts[2].isdigit():
        return False
    boot, ns, pid, started = parts
    if boot != _read("/proc/sys/kernel/random/boot_id") or ns != _pid_namespace() or int(pid) == os.getpid():
        return False
    return _start_time(int(pid)) != started


class Held:
    """The lock while held: its token, and the alias writes fenced by it."""

    def __init__(self, cl: Any, name: str, lock: str, token: str, lease_s: float, grace_s: float):
        self.cl, self.name, self.lock, self.token = cl, name, lock, token
        self.lease_s, self.grace_s = lease_s, grace_s
        self.renewed = time.monotonic()  # when the last renewal that succeeded started

    def check(self) -> None:
        """Raise PromotionConflict unless the lock is still this holder's and its lease is valid
        by this process's own clock (a holder paused past its lease stops writing)."""
        if time.monotonic() - self.renewed > self.lease_s - self.grace_s:
            raise PromotionConflict(f"{self.name}: this run's lock on the aliases lapsed (not renewed for "
                                    f"{time.monotonic() - self.renewed:.0f} s); nothing more is written")
        owner = self.cl.get_registered_model(self.lock).tags.get(OWNER_TAG)
        if owner != self.token:
            raise PromotionConflict(f"{self.name}: the lock on the aliases was taken over (now held by {owner}); "
                                    "nothing more is written")

    def set_alias(self, alias: str, version: str) -> None:
        self.check()
        self.cl.set_registered_model_alias(self.name, alias, version)

    def delete_alias(self, alias: str) -> None:
        self.check()
        self.cl.delete_registered_model_alias(self.name, alias)


def _reap(cl: Any, name: str, lock: str, holder: str, why: str, lease_s: float, grace_s: float) -> None:
    """Remove `holder`'s stale lock if this process wins the right to (see the module docstring).

    The reap marker is a lease like the lock's: it says until when (by the reaper's clock) its
    reaper may act, and the reaper gives up once that time, less the grace, has passed by its own
    monotonic clock (a pause between its check and its delete). Others remove a marker only
    after that time plus the grace: a reaper that stopped never blocks the lock for good."""
    from mlflow.exceptions import MlflowException

    marker = f"{lock}.reap-{hashlib.sha256(holder.encode()).hexdigest()[:16]}"
    began = time.monotonic()
    try:
        cl.create_registered_model(marker, tags={REAP_UNTIL_TAG: str(time.time() + lease_s),
                                                 INTERNAL_TAG: "reap-marker"},
                                   description=REAP_DESCRIPTION.format(name=name))
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        try:  # another reaper has it; unless that reaper stopped with it
            until = float(cl.get_registered_model(marker).tags.get(REAP_UNTIL_TAG, 0))
            if until + grace_s < time.time():
                log.warning("registry: removing a reap marker of %s left by a reaper that stopped", name)
                cl.delete_registered_model(marker)
        except (MlflowException, ValueError):
            pass
        return
    try:
        if cl.get_registered_model(lock).tags.get(OWNER_TAG) == holder:
            if time.monotonic() - began > lease_s - grace_s:
                log.warning("registry: gave up removing the stale lock on %s (this process paused)", name)
                return
            log.warning("registry: removing the lock on %s of %s (%s)", name, holder, why)
            cl.delete_registered_model(lock)
    except MlflowException:
        pass  # gone already
    finally:
        try:
            cl.delete_registered_model(marker)
        except MlflowException:
            pass  # taken as stale by another reaper after this one paused


@contextmanager
def model_lock(cl: Any, name: str, owner: str, lease_s: float = 60.0, wait_s: float = 120.0,
               grace_s: float | None = None) -> Iterator[Held]:
    """Hold the lock on `name`'s aliases (promotion, rollback, registration); yields the fenced
    writer. Raises PromotionConflict when another holder keeps it for over `wait_s` seconds.
    `grace_s` (default a tenth of the lease, at most 10 s) covers clock skew between hosts."""
    from mlflow.exceptions import MlflowException

    grace = min(lease_s / 10, 10.0) if grace_s is None else grace_s
    lock = f"{name}.daybreak-lock"
    token = f"{owner}/{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + wait_s
    while True:
        started = time.monotonic()
        try:
            cl.create_registered_model(lock, tags={OWNER_TAG: token, EXPIRES_TAG: str(time.time() + lease_s),
                                                   HOLDER_TAG: holder_identity(), INTERNAL_TAG: "lock"},
                                       description=LOCK_DESCRIPTION.format(name=name))
            break
        except MlflowException as e:
            # RESOURCE_DOES_NOT_EXIST: the holder released it while the store looked it up
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        holder = "another run"
        try:
            tags = cl.get_registered_model(lock).tags
            holder = tags.get(OWNER_TAG) or holder
            expires = float(tags.get(EXPIRES_TAG, 0))
            gone = holder_gone(tags.get(HOLDER_TAG, ""))
            if gone or expires + grace < time.time():
                _reap(cl, name, lock, holder, "its process is gone" if gone else "its lease ran out", lease_s, grace)
                continue
        except (MlflowException, ValueError):
            pass  # released in between: try again after the pause
        if time.monotonic() > deadline:
            raise PromotionConflict(f"{name}: aliases locked by {holder} for over {wait_s:.0f} s; try again later")
        time.sleep(0.2)
    held = Held(cl, name, lock, token, lease_s, grace)
    held.renewed = started
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease_s / 3):
            try:
                began = time.monotonic()
                if cl.get_registered_model(lock).tags.get(OWNER_TAG) != token:
                    return
                cl.set_registered_model_tag(lock, EXPIRES_TAG, str(time.time() + lease_s))
                held.renewed = began
            except Exception:  # the next renewal tries again; the lease covers a missed one
                log.warning("registry: could not renew the lock on %s", name, exc_info=True)

    renewer = threading.Thread(target=renew, name=f"daybreak-lock-{name}", daemon=True)
    renewer.start()
    try:
        yield held
    finally:
        stop.set()
        renewer.join(timeout=5)
        try:
            # Only while the lease is valid by this process's clock: past it, a reaper may be
            # removing this lock, and a delete here could hit the next holder's.
            if time.monotonic() - held.renewed > lease_s - grace:
                log.warning("registry: the lock on %s lapsed while held; left for its lease to end", name)
            elif cl.get_registered_model(lock).tags.get(OWNER_TAG) == token:
                cl.delete_registered_model(lock)
            else:
                log.warning("registry: the lock on %s expired while held and was taken over", name)
        except MlflowException:
            log.warning("registry: could not release the lock on %s (it expires by itself)", name, exc_info=True)
