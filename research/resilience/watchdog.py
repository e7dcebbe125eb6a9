"""A lost process in a multi-process run: every other process stops within seconds, in one line.

When one process of a run dies (killed, out of memory, its host gone), the others wait in their next
collective for a peer that never comes; jax.distributed notices only after its heartbeat timeout
(runtime.HEARTBEAT_TIMEOUT_SECONDS) and then aborts every process with a C++ stack trace. The
`PeerWatchdog`, a daemon thread that `train_and_evaluate` runs in multi-process runs, beats through
jax.distributed's key-value store (each process bumps its own counter every `interval` seconds) and
times the others' counters on its own clock, so hosts' clocks need not agree. A peer silent for
`timeout` seconds, or a coordinator that stops answering for as long, ends this process with one line
naming the lost process and the newest complete checkpoint, exit status LOST_PROCESS_EXIT. A process
that finishes says so first, and is not mourned. Rerunning the same command resumes. The timeout is
RESEARCH_PEER_TIMEOUT seconds (default 30: long enough for a slow save or compile to starve no beat).

When process 0 itself dies, its coordination service goes with it and jax.distributed aborts the others
within a second ("Terminating process because the JAX distributed service detected fatal errors"), before
any Python code can speak: that path is JAX's own (its Python callback for it fails in jaxlib 0.10).
"""

import os
import sys
import threading
import time
from typing import Callable

import jax
from jax._src import distributed  # the client jax.distributed.initialize made: its key-value store has no public handle

LOST_PROCESS_EXIT = 5
TIMEOUT_VARIABLE, DEFAULT_TIMEOUT = "RESEARCH_PEER_TIMEOUT", 30.0
PREFIX = "research/watchdog"
DONE = "done"


class PeerWatchdog:
    """Start with `start()`, end with `stop()` (or as a context manager); does nothing in a single process."""

    def __init__(self, checkpoint_status: Callable[[], str], interval: float = 2.0, timeout: float | None = None):
        timeout = float(os.environ.get(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT)) if timeout is None else timeout
        self.checkpoint_status, self.interval, self.timeout = checkpoint_status, min(interval, timeout / 4), timeout
        self.stopped = threading.Event()
        self.thread = None
        self.last_beat: dict[int, float] = {}  # per watched peer, when its counter last moved (this clock)

    def __enter__(self) -> "PeerWatchdog":
        client = distributed.global_state.client
        if jax.process_count() > 1 and client is not None:
            self.thread = threading.Thread(target=self._watch, args=(client,), name="peer-watchdog", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.thread is None:
            return
        if exc_info[0] is not None:
            self._await_silent_peers()
        self.stopped.set()
        self.thread.join()
        if exc_info[0] is not None:  # failing: the others find out by its silence, and stop too
            return
        try:  # the others stop watching a process that finished
            distributed.global_state.client.key_value_set(f"{PREFIX}/{jax.process_index()}", DONE, True)
        except Exception as error:  # the coordination service is gone: say so, the others may report us lost
            print(f"could not tell the other processes that process {jax.process_index()} finished: {error}")

    def _await_silent_peers(self) -> None:
        """Failing: a peer's death can break the collective it was in (a reset connection) before the timeout,
        so the error in hand may be the peer's loss. Waits until every peer has beaten since the failure (a few
        seconds), or until the watch thread names the silent one and ends the process (exit LOST_PROCESS_EXIT)."""
        failed = time.monotonic()
        while time.monotonic() - failed < self.timeout + 3 * self.interval:
            # A beat seen within one interval of the failure may be a dead peer's last, read late.
            if all(when > failed + self.interval for when in dict(self.last_beat).values()):
                return
            time.sleep(self.interval / 4)

    def _watch(self, client) -> None:
        me, count = jax.process_index(), jax.process_count()
        beats, answered = 0, time.monotonic()
        seen = {peer: (None, time.monotonic()) for peer in range(count) if peer != me}  # value, when it last changed
        while not self.stopped.wait(self.interval):
            now = time.monotonic()
            try:
                beats += 1
                client.key_value_set(f"{PREFIX}/{me}", str(beats), True)
                values = dict(client.key_value_dir_get(PREFIX))
                answered = now
            except Exception:  # the coordination service (process 0) does not answer
                if now - answered > self.timeout:
                    self._lose(0, now - answered, "its coordination service does not answer")
                continue
            for peer, (value, since) in list(seen.items()):
                current = values.get(f"{PREFIX}/{peer}")
                if current == DONE:
                    del seen[peer]
                    self.last_beat.pop(peer, None)
                elif current != value:
                    seen[peer] = (current, now)
                    self.last_beat[peer] = now
                elif now - since > self.timeout:
                    self._lose(peer, now - since, "no heartbeat")

    def _lose(self, peer: int, silence: float, why: str) -> None:
        if self.stopped.is_set():
            return
        me, count = jax.process_index(), jax.process_count()
        print(
            f"error: process {peer} of {count} is lost ({why} for {silence:.0f} s): stopping process {me} too; "
            f"{self.checkpoint_status()}; rerun the same command on every process to resume",
            file=sys.stderr,
            flush=True,
        )
        os._exit(LOST_PROCESS_EXIT)  # the main thread waits in a collective that will never finish
