"""THE table: which parameter is trained by Muon and which by AdamW, and which is decayed.

Every `nnx.Param` of `GlmForCausalLM` is matched by its dotted path (e.g.
`moe_layers.layers.mlp.w_gate`) against `TABLE`, first match wins. A path that matches no
row is an error: a new parameter must be placed deliberately, never by a default.

| pattern                          | what                                   | optimizer | matrix axes (in, out) | decay |
|----------------------------------|----------------------------------------|-----------|-----------------------|-------|
| `*correction_bias`               | router selection bias (RouterBias)     | refused   | -                     | -     |
| `embed`                          | token embedding [V, H] (+ tied head)   | adamw     | -                     | no    |
| `lm_head.kernel`                 | output head [H, V]                     | adamw     | -                     | yes   |
| `*.scale`                        | RMSNorm gains (all norms, QK-norm)     | adamw     | -                     | no    |
| `*.bias`                         | q/k/v biases                           | adamw     | -                     | no    |
| `*.mlp.router_kernel`            | router gate [.., H, E]                 | adamw     | -                     | yes   |
| `*.attn.{q,k,v,o}_proj.kernel`   | attention, each its own matrix         | muon      | (-2, -1)              | yes   |
| `*mlp.{gate,up,down}_proj.kernel` | dense MLP                           | muon      | (-2, -1)              | yes   |
| `*mlp.shared_experts.{gate,up,down}_proj.kernel` | shared expert        | muon      | (-2, -1)              | yes   |
| `*.mlp.w_{gate,up,down}`         | routed experts [.., E, in, out]        | muon      | (-2, -1), per expert  | yes   |
| `mtp_layers.*.eh_proj.kernel`    | MTP projection [2H, H]                 | muon      | (-2, -1)              | yes   |

Kernels are [in, out]; every axis before the two matrix axes (the scanned layer axis L,
the expert axis E) is a batch axis, so a [L, E, in, out] expert stack is orthogonalised
as L*E separate matrices. Embeddings, head and router follow Keller Jordan's and
Moonlight's split (AdamW); the router is kept off Muon because its [H, E] matrix is a
classifier whose per-expert scale carries the routing decision.

`correction_bias` is a `RouterBias` variable, not a Param: build the optimizer over
`nnx.state(model, nnx.Param)`; if it is handed to the label function anyway it raises.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable
from typing import Any, Literal

import jax
from flax import nnx

MUON = "muon"
ADAMW = "adamw"


@dataclasses.dataclass(frozen=True)
class MatrixDims:
    """Which axes of a leaf form the matrix that Muon orthogonalises: `reduction` (fan-in)
    and `output` (fan-out) axes; all other axes are batch axes (one matrix per index).
    A frozen dataclass, not a NamedTuple, so that jax.tree functions treat it as a leaf."""

    reduction: tuple[int, ...] = (-2,)
    output: tuple[int, ...] = (-1,)


KERNEL = MatrixDims((-2,), (-1,))


@dataclasses.dataclass(frozen=True)
class Rule:
    patterns: tuple[str, ...]
    optimizer: Literal["muon", "adamw", "refused"]
    decay: bool
    dims: MatrixDims | None
    what: str
    # A row left undecayed by convention names the switch that decays it anyway
    # (`decay_mask(..., opt_in=...)`, the config's optimizer.decay_<opt_in>).
    opt_in: str | None = None


def _attn(*names: str) -> tuple[str, ...]:
    return tuple(f"*attn.{n}_proj.kernel" for n in names)


TABLE: tuple[Rule, ...] = (
    Rule(("*correction_bias",), "refused", False, None, "router selection bias (RouterBias)"),
    Rule(("embed",), ADAMW, False, None, "token embedding", opt_in="embeddings"),
    Rule(("lm_head.kernel",), ADAMW, True, None, "output head"),
    Rule(("*.scale", "scale"), ADAMW, False, None, "RMSNorm gains", opt_in="norms_and_biases"),
    Rule(("*.bias",), ADAMW, False, None, "attention biases", opt_in="norms_and_biases"),
    Rule(("*mlp.router_kernel",), ADAMW, True, None, "router gate"),
    Rule(_attn("q", "k", "v", "o"), MUON, True, KERNEL, "attention q/k/v/o"),
    Rule(tuple(f"*mlp.{n}_proj.kernel" for n in ("gate", "up", "down")), MUON, True, KERNEL,
         "dense MLP"),
    Rule(tuple(f"*mlp.shared_experts.{n}_proj.kernel" for n in ("gate", "up", "down")), MUON,
         True, KERNEL, "shared expert"),
    Rule(("*mlp.w_gate", "*mlp.w_up", "*mlp.w_down"), MUON, True, KERNEL, "routed experts"),
    Rule(("mtp_layers.*.eh_proj.kernel",), MUON, True, KERNEL, "MTP projection"),
)


def path_name(keypath: tuple[Any, ...]) -> str:
    """Dotted name of a pytree key path; the trailing `.value` of an `nnx.Variable` (seen
    when the tree holds Variables, as in `tx.init(nnx.state(model, nnx.Param))`) is dropped."""
    parts = []
    for key in keypath:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        else:
            parts.append(str(key))
    if parts and parts[-1] == "value":
        parts.pop()
    return ".".join(parts)


def rule_for(name: str) -> Rule:
    """The first `TABLE` row matching the dotted parameter path `name`."""
    for rule in TABLE:
        if any(fnmatch.fnmatchcase(name, p) for p in rule.patterns):
            if rule.optimizer == "refused":
                raise ValueError(
                    f"{name!r} is the router correction bias (a RouterBias, not an nnx.Param): "
                    "no optimizer may touch it. Build the optimizer over "
                    "nnx.state(model, nnx.Param) / nnx.Optimizer(model, tx, wrt=nnx.Param).")
            return rule
    raise ValueError(f"parameter {name!r} matches no row of glm_jax.optim.labels.TABLE; "
                     "add it there deliberately")


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _map(fn: Callable[[str, Any], Any], params: Any) -> Any:
    def leaf(keypath, x):
        if _is_var(x) and not isinstance(x, nnx.Param):
            raise ValueError(f"{path_name(keypath)!r} is a {type(x).__name__}, not an nnx.Param; "
                             "build the optimizer over nnx.state(model, nnx.Param)")
        name = path_name(keypath)
        rule = rule_for(name)
        if rule.optimizer == MUON:
            ndim = (x.get_value() if _is_var(x) else x).ndim  # arrays or ShapeDtypeStructs
            if ndim < 2:
                raise ValueError(f"Muon leaf {name!r} has rank {ndim}; needs a matrix")
        return fn(name, rule)

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=_is_var)


def param_labels(params: Any) -> Any:
    """Tree of 'muon' / 'adamw' for `optax.partition`; works on arrays, Variables, and trees
    with `optax.MaskedNode` holes."""
    return _map(lambda name, rule: rule.optimizer, params)


def decay_mask(params: Any, opt_in: tuple[str, ...] = ()) -> Any:
    """Tree of bools: True where decoupled weight decay applies: the `decay` column of
    `TABLE`, plus the rows whose `opt_in` switch is listed (e.g. ("embeddings",))."""
    return _map(lambda name, rule: rule.decay or rule.opt_in in opt_in, params)


def matrix_dims(params: Any) -> Any:
    """Tree of `MatrixDims` for Muon leaves (None for AdamW leaves)."""
    return _map(lambda name, rule: rule.dims, params)
