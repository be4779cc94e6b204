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
            name_of = kernel.group(1) if kernel else "other"
            count = float(flops.group(1)) if flops else _grouped_matmul_shape_flops(
                name_of, line)
            if count:
                out[name_of] += mult.get(name, 0.0) * count
    return dict(out)


def _grouped_matmul_shape_flops(kernel: str, line: str) -> float:
    """2 M K N of a megablox gmm / tgmm call that declares no cost (MaxText's own copy of
    the kernels does not), from its shapes, over all M static rows as jax's megablox
    declares: gmm's result is [M, N] with an lhs operand [M, K]; tgmm's result is the
    weight gradient [G, K, N] with operands [M, K] and [M, N]. Other kernels: 0."""
    result = re.match(r"[^=]*=\s*([a-z]+\d*\[[\d,]*\])", line)
    layouts = re.search(r"operand_layout_constraints=\{((?:[^{}]|\{[^{}]*\})*)\}", line)
    if kernel not in ("gmm", "tgmm") or not result or not layouts:
        return 0.0
    out = _dims(result.group(1))
    rows2d = [[int(d) for d in dims.split(",")]
              for dims in re.findall(r"\b(?:bf16|f32|f16)\[(\d+,\d+)\]", layouts.group(1))]
    if kernel == "gmm" and len(out) == 2:
        lhs = next((s for s in rows2d if s[0] == out[0]), None)
        return 2.0 * out[0] * lhs[1] * out[1] if lhs else 0.0
    if kernel == "tgmm" and len(out) == 3 and rows2d:
        return 2.0 * rows2d[0][0] * out[1] * out[2]
    return 0.0


def collective_bytes(hlo: str, num_devices: int) -> dict[str, float]:
    """Bytes each device sends per step, per collective kind, from compiled HLO text.

    Collectives inside a `while` body (the layer scan) count once per trip
    (`known_trip_count`). Bytes sent with ring algorithms, from the per-device result size
    S and the group size n: all-gather S(n-1)/n, reduce-scatter S(n-1) (S is the scattered
    result), all-reduce 2S(n-1)/n, all-to-all S(n-1)/n, collective-permute S;
    ragged-all-to-all (n-1)/n of the smaller of its input and output (the real rows, which
    at balanced routing all leave the device)."""
    comps, mult = _run_counts(hlo)
    types = _instructions(hlo)[1] if "ragged-all-to-all" in hlo else {}
    out: dict[str, float] = defaultdict(float)
    for name, lines in comps.items():
        for line in lines:
            m = re.match(r"\s*(ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s("
                         + "|".join(COLLECTIVES) + r")(-start)?\(", line)
            if not m:
                continue
            kind, size = m.group(3), _shape_bytes(m.group(2))
            if kind == "ragged-all-to-all":
                # Only real rows move, and a device sends at most its input and receives at
                # most its output buffer: the smaller of the two (the dispatch's input is
                # the device's own token-expert rows, the return's output the same rows;
                # the other side is the padded receive buffer).
                operand = re.search(r"ragged-all-to-all\(%?([\w.\-]+)", line)
                if operand and operand.group(1) in types:
                    size = min(size, _shape_bytes(types[operand.group(1)]))
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


# ------------------------------------------------------------ FLOPs and HBM traffic
_DEF = re.compile(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
# Instructions that move no data of their own (views, tuples, control flow whose bodies are
# counted separately) or whose traffic is the interconnect's (collectives).
_NO_HBM = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
           "conditional", "call", "after-all", "partition-id", "replica-id", "copy-done",
           "opt-barrier", "add-dependency", "domain"}


def _instructions(hlo: str):
    """(computation, name, result type text, opcode, operand names, rest of line) of every
    instruction, and name -> result type text."""
    comps, _ = _run_counts(hlo)
    out, types = [], {}
    for comp, lines in comps.items():
        for line in lines:
            m = _DEF.match(line)
            if not m:
                continue
            name, rtype, op, rest = m.groups()
            operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
            out.append((comp, name, rtype, op, operands, rest))
            types[name] = rtype
    return out, types


def _dims(rtype: str) -> list[int]:
    m = re.search(r"\b[a-z]+\d*\[([\d,]*)\]", rtype)
    return [int(d) for d in filter(None, m.group(1).split(","))] if m else []


def _matmul_flops(op: str, rtype: str, operands: list[str], rest: str,
                  types: dict[str, str]) -> float:
    """2 x output elements x contracted elements of one dot / convolution."""
    out = 1
    for d in _dims(rtype):
        out *= d
    lhs = _dims(types.get(operands[0], "")) if operands else []
    if op == "dot":
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        contracted = 1
        for i in filter(None, (m.group(1) if m else "").split(",")):
            contracted *= lhs[int(i)] if int(i) < len(lhs) else 1
        return 2.0 * out * contracted
    # convolution, dim_labels like bf_io->bf or 0b1f2_0o12i->01bf2: the TPU compiler
    # writes dots as convolutions whose spatial dimensions (digits) are the dot's batch
    # dimensions, one valid window tap per output element (GLM has no true convolution), so
    # contracted = the input feature dimension (per feature group).
    m = re.search(r"dim_labels=([\w]+)_([\w]+)->", rest)
    if not m or not lhs or "f" not in m.group(1):
        return 0.0
    contracted = lhs[m.group(1).index("f")]
    groups = re.search(r"feature_group_count=(\d+)", rest)
    contracted //= int(groups.group(1)) if groups else 1
    # Spatial dimensions with a window: a second contracted dimension (window={size=96}
    # over an input of 96 into an output of 1: a dot over heads x head_dim, 96 taps per
    # output element), or a batch dimension (size=8 pad=7_7 over an input of 1 into an
    # output of 8: one tap). Count the taps that land on the input, per output element.
    window = re.search(r"window=\{size=([\dx]+)(?: pad=([\d_x]+))?", rest)
    labels = re.search(r"dim_labels=(\w+)_\w+->(\w+)", rest)
    # Dilated or strided windows (batch dimensions written with lhs_dilate) keep the
    # one-tap count: the tap formula below assumes stride 1 and no dilation.
    if window and labels and not re.search(r"(dilate|stride)=", rest):
        sizes = [int(w) for w in window.group(1).split("x")]
        pads = [int(p.split("_")[0]) for p in window.group(2).split("x")] \
            if window.group(2) else [0] * len(sizes)
        out_dims = _dims(rtype)
        for d, (w, pad) in enumerate(zip(sizes, pads)):
            i_size = lhs[labels.group(1).index(str(d))]
            o_size = out_dims[labels.group(2).index(str(d))]
            pairs = sum(max(0, min(i_size, o_size - pad + t) - max(0, t - pad))
                        for t in range(w))  # inputs i with 0 <= i + pad - t < o_size
            contracted *= pairs / o_size
    return 2.0 * out * contracted


def matmul_flops(hlo: str, per_trip: bool = True) -> float:
    """FLOPs per step of the XLA dots and convolutions (matmuls lowered by the compiler;
    Pallas kernels are not in it: `kernel_flops`), loop bodies once per trip. With
    per_trip=False each instruction once, as the TPU cost analysis counts."""
    _, mult = _run_counts(hlo)
    insts, types = _instructions(hlo)
    total = 0.0
    for comp, _, rtype, op, operands, rest in insts:
        if op in ("dot", "convolution"):
            total += (mult.get(comp, 0.0) if per_trip else 1.0) * \
                _matmul_flops(op, rtype, operands, rest, types)
    return total


def hbm_bytes(hlo: str, per_trip: bool = True) -> float:
    """Bytes per step that the top-level instructions (fusions, kernels, copies; not what
    runs inside a fusion, which stays on chip) read and write: operands + results, loop
    bodies once per trip. Collectives are left out (they are the interconnect's traffic,
    `collective_bytes`). A roofline's memory term; the TPU keeps some buffers in on-chip
    memory, so this is an upper bound of HBM traffic."""
    comps, mult = _run_counts(hlo)
    insts, types = _instructions(hlo)
    fused = set()
    for comp, _, _, op, _, rest in insts:
        if op == "fusion":
            fused.update(re.findall(r"calls=%?([\w.\-]+)", rest))
    total = 0.0
    for comp, _, rtype, op, operands, rest in insts:
        if comp in fused or op in _NO_HBM or any(op.startswith(c) for c in COLLECTIVES):
            continue
        size = _shape_bytes(rtype) + sum(_shape_bytes(types.get(o, "")) for o in operands)
        total += (mult.get(comp, 0.0) if per_trip else 1.0) * size
    return total


# Matmuls per visited [block_q, block_kv] tile of the splash attention kernels (per head):
# forward q k^T and p v; dq recomputes q k^T, then dO v^T and dS k; dkv recomputes q k^T,
# then dO v^T, p^T dO and dS^T q.
_SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}


def splash_flops(hlo: str, per_trip: bool = True) -> float:
    """FLOPs per step of the Pallas splash attention kernels, which declare none: for each
    call, 2 x block_q x block_kv x head_dim per matmul (`_SPLASH_MATMULS`) over the causal
    tiles nb (nb + 1) / 2 of its nb x nb block grid, for every head (and batch row) of its
    query operand [..., heads, T, head_dim]. Assumes the causal mask (glm_jax's only one)."""
    comps, mult = _run_counts(hlo)
    total = 0.0
    for comp, lines in comps.items():
        for line in lines:
            m = re.match(r"\s*(?:ROOT\s+)?%?splash_mha_(fwd|dq|dkv)\w*", line)
            layouts = re.search(r"operand_layout_constraints=\{((?:[^{}]|\{[^{}]*\})*)\}", line)
            if not m or not layouts:
                continue
            shapes = [[int(d) for d in filter(None, dims.split(","))]
                      for dims in re.findall(r"\[([\d,]*)\]", layouts.group(1))]
            grid = next((s for s in shapes if len(s) == 3 and s[1] == s[2]), None)
            query = next((s for s in shapes if len(s) >= 3 and s[-1] >= 64 and s[-2] > s[-1]),
                         None)
            if grid is None or query is None:
                continue
            nb, t, d = grid[1], query[-2], query[-1]
            rows = 1
            for x in query[:-2]:
                rows *= x
            block = t // nb
            flops = (2.0 * block * block * d * _SPLASH_MATMULS[m.group(1)] * rows
                     * nb * (nb + 1) / 2)
            total += (mult.get(comp, 0.0) if per_trip else 1.0) * flops
    return total
