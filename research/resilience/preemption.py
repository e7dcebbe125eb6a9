"""Preemption: SIGTERM, SIGINT or SLURM's warning SIGUSR1 (research/resilience/slurm.py) asks the loop to save and
stop at the next step boundary; a second signal exits at once."""

import signal
import threading


class PreemptionWatcher:
    """SIGTERM/SIGINT, and SLURM's warning SIGUSR1 (slurm.py beside this), ask the loop to save and stop at the
    next step boundary; a second one exits at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.requested = None
        self.previous = {}

    def __enter__(self) -> "PreemptionWatcher":
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def _handle(self, number, frame) -> None:
        if self.requested is not None:
            raise SystemExit(f"second {signal.Signals(number).name}: exiting without saving")
        self.requested = signal.Signals(number).name
        print(f"\n{self.requested} received: saving a checkpoint at the end of this step, then stopping")

    def __exit__(self, *exc_info) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
