"""The collectives of a compiled XLA program, read from its HLO text: kind, bytes and how often each runs.

A collective inside a while loop (the scanned layers) runs once per iteration: each computation's count is
its callers' counts times the loop's trip count (XLA's `known_trip_count`, else the bound its condition
compares the induction variable with). Bytes are per device and per step, the traffic a ring algorithm puts
on each device's links (Patarasuk & Yuan 2009): all-gather and all-to-all (n-1)/n of the result,
reduce-scatter (n-1)/n of the input, all-reduce twice that, a permute its whole buffer.
"""

import collections
import dataclasses
import functools
import re

import numpy as np

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4}
DTYPE_BYTES |= {"s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (.*?) ([a-z][\w\-]*)\(")
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")


@dataclasses.dataclass
class Collective:
    kind: str
    group_size: int  # devices taking part in each group
    array_bytes: int  # the collective's result (all-reduce, all-gather, all-to-all, permute) or input (reduce-scatter)
    count: int  # executions per step
    groups: list[list[int]]  # device ids (the program's flat device order) of each group

    @property
    def bytes_per_step(self) -> float:
        """Bytes each device sends per step (ring algorithms)."""
        n = self.group_size
        share = {"all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}.get(self.kind, (n - 1) / max(n, 1))
        return self.array_bytes * share * self.count


def array_bytes(type_text: str) -> list[int]:
    """Bytes of every array in an HLO type ("bf16[8,128]{1,0}" or a tuple of them), in order."""
    return [
        DTYPE_BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
        for dtype, dims in _ARRAY.findall(type_text)
    ]


@functools.lru_cache(maxsize=2)  # one program is read for its collectives and its loops: parsed once
def computations(text: str) -> dict[str, list[str]]:
    """Each computation's instruction lines, by name (shared: do not modify)."""
    bodies, current = {}, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and line.rstrip().endswith("{"):
            current = bodies.setdefault(header[1], [])
        elif current is not None and line.strip() != "}":
            current.append(line)
    return bodies


def trip_count(line: str, bodies: dict[str, list[str]]) -> int:
    """Iterations of the while loop on `line`: XLA's known trip count, else its condition's integer bound."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    if known:
        return int(known[1])
    condition = re.search(r"condition=%([\w.\-]+)", line)
    constants = [
        int(value)
        for cond_line in bodies.get(condition[1] if condition else "", [])
        for value in re.findall(r"s32\[\][^=]*constant\((\d+)\)", cond_line)
    ]
    return constants[0] if len(constants) == 1 else 1


@functools.lru_cache(maxsize=2)
def execution_counts(text: str) -> dict[str, int]:
    """How many times each computation runs per call of the entry computation (shared: do not modify)."""
    bodies = computations(text)
    entry = re.search(r"^ENTRY %([\w.\-]+)", text, re.MULTILINE)
    counts: dict[str, int] = collections.Counter()
    if entry is None:
        return counts

    def visit(name: str, times: int, depth: int = 0) -> None:
        counts[name] += times
        if depth > 64:
            return
        for line in bodies.get(name, []):
            factor = trip_count(line, bodies) if " while(" in line else 1
            for match in re.finditer(r"(body|calls|to_apply|branch_computations)=\{?((?:%[\w.\-]+(?:, )?)+)", line):
                for callee in re.findall(r"%([\w.\-]+)", match[2]):
                    visit(callee, times * (factor if match[1] == "body" else 1), depth + 1)

    visit(entry[1], 1)
    return counts


def replica_groups(line: str, devices: int) -> list[list[int]]:
    """The device groups of a collective: explicit {{0,1},{2,3}}, iota [G,S]<=[dims]T(perm), or mesh[...]{axes}."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if mesh:
        axes = re.findall(r"'(\w+)'=(\d+)", mesh[1])
        names, sizes = [name for name, _ in axes], [int(size) for _, size in axes]
        grouped = [names.index(name) for name in re.findall(r"'(\w+)'", mesh[2])]
        ids = np.arange(int(np.prod(sizes))).reshape(sizes)
        rest = [axis for axis in range(len(sizes)) if axis not in grouped]
        size = int(np.prod([sizes[axis] for axis in grouped])) if grouped else 1
        return ids.transpose(rest + grouped).reshape(-1, size).tolist()
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if iota:
        dims = [int(d) for d in iota[3].split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if iota[4]:
            ids = ids.transpose([int(p) for p in iota[4].split(",")])
        return ids.reshape(int(iota[1]), int(iota[2])).tolist()
    explicit = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", line)
    if explicit and explicit[1]:
        return [[int(i) for i in group.split(",") if i] for group in re.findall(r"\{([\d,]*)\}", explicit[1])]
    pairs = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line)
    if pairs:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", pairs[1])]
    return [list(range(devices))]


def collectives(text: str, devices: int) -> list[Collective]:
    """Every collective of a compiled program's HLO text with its per-step count (asynchronous pairs once)."""
    counts, found = execution_counts(text), []
    for name, lines in computations(text).items():
        times = counts.get(name, 0)
        for line in lines:
            instruction = _INSTRUCTION.match(line)
            if not instruction or not times:
                continue
            opcode = instruction[2]
            kind = opcode.removesuffix("-start")
            if kind not in KINDS:
                continue
            sizes = array_bytes(instruction[1])
            if opcode.endswith("-start") and kind in ("all-gather", "reduce-scatter", "all-to-all"):
                sizes = sizes[len(sizes) // 2 :]  # ((operands), (results)): the results
            elif opcode.endswith("-start") and kind == "collective-permute":
                sizes = sizes[:1]
            groups = replica_groups(line, devices)
            size = max(len(group) for group in groups) if kind != "collective-permute" else 2
            total = sum(sizes)
            if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
                kind = "reduce-scatter"  # the TPU compiler's form: an all-reduce fused with the slice it keeps
            elif kind == "reduce-scatter":
                total *= size  # its input: the result is one device's share
            found.append(Collective(kind, size, total, times, groups))
    return found
