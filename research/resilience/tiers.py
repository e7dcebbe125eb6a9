"""A second tier of checkpoints on fast local disk (`checkpoint.local_dir`), behind one manager's interface."""

import orbax.checkpoint as ocp

# Config keys that may differ between a run's hosts or reruns without changing the run.
PER_HOST_KEYS = ("checkpoint.local_dir",)


class Tiers:
    """Two tiers of orbax checkpoints behind one manager's interface: a fast local one (`checkpoint.local_dir`,
    saved every `local_every_steps`, the last `local_keep` kept) and the persistent one in the workdir (the
    usual policy). A forced save (preemption, the end, a best metric) goes to both. `restore_latest` takes the
    newest complete, readable step of either, the local copy first; a missing tier simply has no steps.
    On several hosts the local directory must be one path that every process sees (orbax writes one
    step's shards from every process into it)."""

    def __init__(self, local: ocp.CheckpointManager, persistent: ocp.CheckpointManager):
        self.local, self.persistent, self.tiers = local, persistent, [local, persistent]
        self.directory = persistent.directory

    def should_save(self, step: int) -> bool:
        return any(tier.should_save(step) for tier in self.tiers)

    def save(self, step: int, args, metrics=None, force: bool = False) -> bool:
        saved = [
            tier.save(step, args=args, metrics=metrics, force=True)
            for tier in self.tiers
            if force or tier.should_save(step)
        ]
        return any(saved)

    def all_steps(self) -> list[int]:
        return sorted(set(self.local.all_steps()) | set(self.persistent.all_steps()))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def wait_until_finished(self) -> None:
        for tier in self.tiers:
            tier.wait_until_finished()

    def reload(self) -> None:
        for tier in self.tiers:
            tier.reload()

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> "Tiers":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def tiers_of(manager) -> list[ocp.CheckpointManager]:
    """The orbax managers behind `manager`: the local tier first."""
    return manager.tiers if isinstance(manager, Tiers) else [manager]
