"""Statistics read from compiled HLO text: the bytes each collective sends per step and
the FLOPs Pallas kernels declare, with loop bodies (the layer scan, the micro-batch loop)
counted once per trip. Used by sharding.plan and bench/sharded_step.py."""

from __future__ import annotations

import re
from collections import defaultdict

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute", "ragged-all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def _shape_bytes(text: str) -> int:
    """Bytes of an HLO result type: 'f32[4,8]{1,0}' or a tuple '(f32[4], bf16[2,2])'."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
        if dtype in _DTYPE_BYTES:
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            total += n * _DTYPE_BYTES[dtype]
    return total


def _group_size(line: str, num_devices: int) -> int:
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)  # iota form [groups,size]<=[..]
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    return num_devices


def _run_counts(hlo: str) -> tuple[dict[str, list[str]], dict[str, float]]:
    """The computations of compiled HLO text (name -> instruction lines) and how often
    each runs per step: a `while` body (the layer scan) once per trip (`known_trip_count`)."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        # computation headers start in column 0 ('%name (...) -> ... {'); instructions are
        # indented
        m = re.match(r"(ENTRY\s+)?%?([\w.\-]+)\s*\(", line)
        if m and line.rstrip().endswith("{"):
            current = m.group(2)
            comps[current] = []
            if m.group(1):
                entry = current
        elif current is not None:
            comps[current].append(line)
    # multiplier of each computation = how often it runs per step
    mult: dict[str, float] = defaultdict(float)

    def visit(name: str, factor: float) -> None:
        mult[name] += factor
        for line in comps.get(name, ()):
            trip = 1.0
            if re.search(r"\swhile\(", line):
                m = re.search(r'known_trip_count[^0-9]*(\d+)', line)
                trip = float(m.group(1)) if m else _trip_from_condition(line, comps)
            for key, callee in re.findall(r"\b(body|condition|to_apply|calls|"
                                          r"true_computation|false_computation)=%?([\w.\-]+)",
                                          line):
                if callee in comps and key != "to_apply":
                    visit(callee, factor * (trip if key == "body" else 1.0))
            m = re.search(r"branch_computations=\{([^}]*)\}", line)
            if m:
                for callee in re.findall(r"%?([\w.\-]+)", m.group(1)):
                    if callee in comps:
                        visit(callee, factor)

    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    visit(entry, 1.0)
    return comps, mult


def _trip_from_condition(while_line: str, comps: dict[str, list[str]]) -> float:
    """Trip count of a `while` whose HLO carries no known_trip_count (the TPU compiler's
    output): its condition compares the counter (from 0) with one s32 constant,
    `counter < N`. 1 when the condition is not of that form."""
    m = re.search(r"condition=%?([\w.\-]+)", while_line)
    body = "\n".join(comps.get(m.group(1), ())) if m else ""
    consts = re.findall(r"s32\[\](?:\{[^}]*\})? constant\((\d+)\)", body)
    if len(consts) == 1 and "direction=LT" in body:
        return float(consts[0])
    return 1.0


def kernel_flops(hlo: str, per_trip: bool = True) -> dict[str, float]:
    """FLOPs per step that Pallas TPU kernels declare (their CostEstimate, which the
    compiler's cost analysis adopts), by kernel (the instruction's name: gmm, tgmm,
    splash_mha_fwd_segmented_residuals, ...), counting scanned layers once per trip;
    with per_trip=False each instruction once, as the TPU cost analysis counts loop bodies
    (measured: GLM-4.5's step with a 4-trip micro-batch loop reports 0.62x the analytic
    FLOPs)."""
    comps, mult = _run_counts(hlo)
    if not per_trip:
        mult = {name: 1.0 for name in mult}
    out: dict[str, float] = defaultdict(float)
    for name, lines in comps.items():
        for line in lines:
            if 'custom_call_target="tpu_custom_call"' not in line:
                continue
            flops = re.search(r'"cost_estimate":\{"flops":"(\d+)"', line)
            kernel = re.match(r"\s*(?:ROOT\s+)?%?([\w\-]+?)(?:\.\d+)?\s*=", line)
            if flops:
                out[kernel.group(1) if kernel else "other"] += mult.get(name, 0.0) * \
                    float(flops.group(1))
    return dict(out)


def collective_bytes(hlo: str, num_devices: int) -> dict[str, float]:
    """Bytes each device sends per step, per collective kind, from compiled HLO text.

    Collectives inside a `while` body (the layer scan) count once per trip
    (`known_trip_count`). Bytes sent with ring algorithms, from the per-device result size
    S and the group size n: all-gather S(n-1)/n, reduce-scatter S(n-1) (S is the scattered
    result), all-reduce 2S(n-1)/n, all-to-all S(n-1)/n, collective-permute S."""
    comps, mult = _run_counts(hlo)
    out: dict[str, float] = defaultdict(float)
    for name, lines in comps.items():
        for line in lines:
            m = re.match(r"\s*(ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s("
                         + "|".join(COLLECTIVES) + r")(-start)?\(", line)
            if not m:
                continue
            kind, size = m.group(3), _shape_bytes(m.group(2))
            if m.group(4):  # async start: result tuple holds (operand, result); keep result
                size = _shape_bytes(m.group(2).rsplit(",", 1)[-1]) if kind != "all-reduce" \
                    else size / 2
            n = _group_size(line, num_devices)
            if n <= 1:
                continue
            factor = {"all-gather": (n - 1) / n, "reduce-scatter": n - 1,
                      "all-reduce": 2 * (n - 1) / n, "all-to-all": (n - 1) / n,
                      "ragged-all-to-all": (n - 1) / n, "collective-permute": 1.0}[kind]
            out[kind] += mult.get(name, 0.0) * size * factor
    return dict(out)
