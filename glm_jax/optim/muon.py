"""Muon (momentum + Newton-Schulz orthogonalisation) as an optax GradientTransformation,
and `muon()`: Muon for every weight matrix (per expert), AdamW for the rest.

Numerics follow `optax.contrib.muon` 0.2.8 (the test oracle, see tests/test_muon.py):
  mu_t   = beta * mu_{t-1} + (1 - beta) * g_t                     (float32)
  nesterov: m_hat = beta * mu_t / (1 - beta^(t+1)) + (1 - beta) * g_t / (1 - beta^t)
  else:     m_hat = mu_t / (1 - beta^t)
  O      = NS5(m_hat)  per matrix, quintic (a, b, c) = (3.4445, -4.7750, 2.0315)
  update = consistent_rms * sqrt(max(fan_in, fan_out)) * O        (Moonlight eq. 4)
and `muon()` chains decoupled weight decay and the (scheduled) learning rate:
  W <- W - lr_t * (update + wd * W).
The Nesterov form is optax's bias-corrected one; it has the direction of Keller Jordan's
beta*buf + (1-beta)*g except during the first steps (cosine 0.995 at step 2, ~1 by step 20).

Sharding (when `shardings` is given): the NS input of each leaf is constrained once per
step to a layout in which its matrix axes are unsharded and the mesh axes that sharded
them are moved onto batch axes (experts, layers) where the sizes divide -- an all-to-all,
so an expert stack is orthogonalised locally with whole matrices per device. Mesh axes
that fit on no batch axis are dropped, i.e. the matrix is all-gathered once and every
device of that group runs the same NS. Without the constraint GSPMD keeps the matrix
sharded through the iteration and all-gathers or all-reduces on each of the 5 steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from glm_jax.optim import labels as labels_lib
from glm_jax.optim.labels import KERNEL, MatrixDims, path_name

NS_COEFFS = (3.4445, -4.7750, 2.0315)

DimsArg = MatrixDims | Callable[[Any], Any] | None


class MuonState(NamedTuple):
    count: jax.Array  # int32 scalar: number of updates so far
    mu: Any  # float32 momentum, same tree as the params


def _normalize(dims: MatrixDims, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...],
                                                       tuple[int, ...]]:
    red = tuple(a % ndim for a in dims.reduction)
    out = tuple(a % ndim for a in dims.output)
    if ndim < 2 or set(red) & set(out) or not red or not out:
        raise ValueError(f"bad matrix dims {dims} for a rank-{ndim} leaf")
    batch = tuple(a for a in range(ndim) if a not in red and a not in out)
    return batch, red, out


def newton_schulz(x: jax.Array, coeffs: Sequence[tuple[float, float, float]], eps: float,
                  ns_dtype: Any = jnp.float32,
                  pin: Callable[[jax.Array], jax.Array] = lambda a: a) -> jax.Array:
    """Orthogonalise every matrix of `x` [..., m, n] (m <= n, float32) with the quintic
    iteration X <- aX + (bA + cA^2)X, A = XX^T. Matmul operands are cast to `ns_dtype`
    and accumulate in float32; the iterate itself stays float32. `pin` is applied to every
    iterate and Gram (a sharding constraint keeping the whole loop local)."""

    def mm(p, q):
        return jnp.matmul(p.astype(ns_dtype), q.astype(ns_dtype),
                          preferred_element_type=jnp.float32)

    # Rescale by the power of two nearest the max first, so the Frobenius norm neither
    # underflows nor is swamped by eps for tiny gradients (squaring a 1e-20 entry
    # underflows float32) and NS stays scale invariant down to denormals. A power of two is exact: no extra rounding.
    peak = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True)
    _, exponent = jnp.frexp(jnp.maximum(peak, jnp.finfo(jnp.float32).tiny))
    x = jnp.ldexp(x, -exponent)
    x = x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + eps)
    x = pin(x)
    for a, b, c in coeffs:
        gram = pin(mm(x, jnp.swapaxes(x, -1, -2)))
        # (c * A) @ A, not c * (A @ A): optax's operation order (`c * a @ a` in Python),
        # so that the two agree to float32 rounding of the same program.
        poly = b * gram + mm(c * gram, gram)
        x = pin(a * x + mm(poly, x))
    return x


def _ns_spec(spec: PartitionSpec, shape: tuple[int, ...], batch: tuple[int, ...],
             mesh: jax.sharding.Mesh) -> PartitionSpec:
    """Layout for NS: matrix axes unsharded; their mesh axes appended to the batch axes
    (experts first: the axis already sharded) where the size divides, else dropped."""
    entries = [() if e is None else ((e,) if isinstance(e, str) else tuple(e))
               for e in tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))]
    moved = [a for i, e in enumerate(entries) if i not in batch for a in e]
    out = [entries[i] if i in batch else () for i in range(len(shape))]
    order = sorted(batch, key=lambda i: (not out[i], -shape[i]))
    for axis in moved:
        for i in order:
            size = math.prod(mesh.shape[a] for a in out[i]) * mesh.shape[axis]
            if shape[i] % size == 0:
                out[i] = out[i] + (axis,)
                break
    return PartitionSpec(*[None if not e else (e[0] if len(e) == 1 else e) for e in out])


def orthogonalize(x: jax.Array, dims: MatrixDims, coeffs: Sequence[tuple[float, float, float]],
                  eps: float, ns_dtype: Any = jnp.float32,
                  sharding: NamedSharding | None = None) -> jax.Array:
    """NS-orthogonalise each matrix of `x` given by `dims` (batch axes kept separate, so a
    sharded expert axis stays sharded). Returns float32 in the layout of `x`."""
    batch, red, out = _normalize(dims, x.ndim)
    x = x.astype(jnp.float32)
    move = jax.lax.with_sharding_constraint
    if sharding is None and _explicit(jax.typeof(x).sharding):
        # Explicit-axes mesh: the layout is part of the type, and must be changed by reshard.
        sharding, move = jax.typeof(x).sharding, jax.sharding.reshard
    pin = lambda a: a  # noqa: E731
    if sharding is not None:
        ns = _ns_spec(sharding.spec, x.shape, batch, sharding.mesh)
        x = move(x, NamedSharding(sharding.mesh, ns))
        # The same layout for every iterate: [batch.., m, n] with matrix axes unsharded.
        # Without it GSPMD propagates the final (param) layout back into the loop.
        inner = NamedSharding(sharding.mesh, PartitionSpec(
            *(tuple(ns[a] for a in batch) or (None,)), None, None))
        pin = lambda a: move(a, inner)  # noqa: E731
    perm = batch + red + out
    bshape = tuple(x.shape[a] for a in batch)
    m, n = math.prod(x.shape[a] for a in red), math.prod(x.shape[a] for a in out)
    # A lone matrix gets a unit batch axis, as in optax's vmap: XLA:CPU lowers batched
    # and plain dots with different summation orders (~7e-7 apart after NS), and the
    # oracle test compares at that level.
    y = jnp.transpose(x, perm).reshape((bshape or (1,)) + (m, n))
    if m > n:  # iterate on the short side: the Gram is min(m, n)^2; f(X^T) = f(X)^T
        y = jnp.swapaxes(newton_schulz(jnp.swapaxes(y, -1, -2), coeffs, eps, ns_dtype, pin),
                         -1, -2)
    else:
        y = newton_schulz(y, coeffs, eps, ns_dtype, pin)
    y = y.reshape(bshape + tuple(x.shape[a] for a in red + out))
    y = jnp.transpose(y, tuple(sorted(range(x.ndim), key=perm.__getitem__)))
    if sharding is not None:
        y = move(y, sharding)
    return y


def _explicit(sharding: Any) -> bool:
    mesh = getattr(sharding, "mesh", None)
    return (isinstance(sharding, NamedSharding) and mesh is not None and not mesh.empty
            and any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types))


def _coeff_list(ns_coeffs: Any, ns_steps: int) -> tuple[tuple[float, float, float], ...]:
    if len(ns_coeffs) == 3 and all(isinstance(c, (int, float)) for c in ns_coeffs):
        return (tuple(float(c) for c in ns_coeffs),) * ns_steps
    steps = tuple(tuple(float(c) for c in step) for step in ns_coeffs)
    if any(len(s) != 3 for s in steps) or len(steps) < ns_steps:
        raise ValueError(f"ns_coeffs must be (a, b, c) or >= {ns_steps} such triples")
    return steps[-ns_steps:]


def scale_by_muon(ns_coeffs: Any = NS_COEFFS, ns_steps: int = 5, beta: float = 0.95,
                  eps: float = 1e-8, *, nesterov: bool = True,
                  consistent_rms: float | None = 0.2, dimension_numbers: DimsArg = None,
                  ns_dtype: Any = jnp.float32, mu_dtype: Any = jnp.float32,
                  shardings: Mapping[str, NamedSharding] | None = None,
                  ) -> optax.GradientTransformation:
    """Muon direction for matrix leaves: momentum, NS orthogonalisation, shape scale.

    Args:
      ns_coeffs: one (a, b, c) for every step, or a sequence of per-step triples (the
        last `ns_steps` are used).
      ns_steps: Newton-Schulz iterations.
      beta, nesterov: momentum; see the module docstring for the exact form.
      eps: added to the Frobenius norm before the iteration.
      consistent_rms: multiply by consistent_rms * sqrt(max(fan_in, fan_out)) with fans from
        the matrix axes only (per expert); None leaves the raw NS output.
      dimension_numbers: a `MatrixDims` for all leaves, a callable params -> tree of
        `MatrixDims`, or None for the last two axes ([.., in, out] kernels).
      ns_dtype: dtype of the NS matmul operands (bfloat16 on accelerators); float32 accumulation.
      mu_dtype: momentum dtype (float32 unless memory forces otherwise).
      shardings: dotted param path -> NamedSharding of that parameter (see
        `param_shardings`); enables the once-per-step NS layout described above.
    """
    coeffs = _coeff_list(ns_coeffs, ns_steps)

    def resolve(tree) -> Callable[[str], MatrixDims]:
        """Dims by dotted path name: the callable may return `MatrixDims` at `nnx.Variable`
        positions (a prefix of the array tree), so match by name, not by structure."""
        if dimension_numbers is None or isinstance(dimension_numbers, MatrixDims):
            return lambda name: dimension_numbers or KERNEL
        table = {path_name(kp): d for kp, d in jax.tree_util.tree_leaves_with_path(
            dimension_numbers(tree), is_leaf=lambda d: isinstance(d, MatrixDims))}

        def lookup(name: str) -> MatrixDims:
            if not isinstance(table.get(name), MatrixDims):
                raise ValueError(f"no Muon matrix dims for {name!r}")
            return table[name]
        return lookup

    def init_fn(params):
        mu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype), params)
        return MuonState(count=jnp.zeros([], jnp.int32), mu=mu)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g.astype(mu_dtype),
                          state.mu, updates)
        # Same operations, in the same order, as optax: NS amplifies rounding differences
        # of its input (slope ~3.4^5 near zero), so the oracle test needs them identical.
        g32 = jax.tree.map(lambda g: g.astype(jnp.float32), updates)
        if nesterov:
            m_hat = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g,
                                 optax.tree.bias_correction(mu, beta,
                                                            optax.safe_increment(count)),
                                 optax.tree.bias_correction(g32, beta, count))
        else:
            m_hat = optax.tree.bias_correction(mu, beta, count)

        dims_of = resolve(updates)

        def leaf(keypath, x, g):
            name = path_name(keypath)
            dims = dims_of(name)
            sharding = shardings.get(name) if shardings else None
            o = orthogonalize(x, dims, coeffs, eps, ns_dtype, sharding)
            if consistent_rms is not None:
                batch, red, out = _normalize(dims, x.ndim)
                fan_in = math.prod(x.shape[a] for a in red)
                fan_out = math.prod(x.shape[a] for a in out)
                o = o * (consistent_rms * math.sqrt(max(fan_in, fan_out)))
            return o.astype(g.dtype)

        new = jax.tree_util.tree_map_with_path(leaf, m_hat, updates)
        return new, MuonState(count=count, mu=mu)

    return optax.GradientTransformation(init_fn, update_fn)


def param_shardings(params: Any) -> dict[str, NamedSharding]:
    """Dotted path -> NamedSharding of every placed parameter of `params` (e.g.
    `nnx.state(model, nnx.Param)` after `sharding.rules.shard_model`)."""
    out = {}
    for keypath, x in jax.tree_util.tree_leaves_with_path(params):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding):
            out[path_name(keypath)] = sharding
    return out


def muon(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.0, *,
         beta: float = 0.95, nesterov: bool = True, ns_coeffs: Any = NS_COEFFS,
         ns_steps: int = 5, eps: float = 1e-8, consistent_rms: float | None = 0.2,
         ns_dtype: Any = jnp.float32,
         adam_learning_rate: optax.ScalarOrSchedule | None = None, adam_b1: float = 0.9,
         adam_b2: float = 0.95, adam_eps: float = 1e-8,
         weight_decay_mask: Any = None,
         shardings: Mapping[str, NamedSharding] | None = None) -> optax.GradientTransformation:
    """Muon for the weight matrices, AdamW for the rest, routed by `labels.TABLE`.

    Args:
      learning_rate: float or optax schedule, shared by both sides (Moonlight's
        consistent-RMS scale makes Muon's update RMS ~0.2 like AdamW's).
      weight_decay: decoupled, multiplied by the scheduled lr on both sides:
        W <- W - lr_t * (update + weight_decay * W).
      adam_learning_rate: a different lr (or schedule) for the AdamW side.
      adam_b1, adam_b2, adam_eps: plain AdamW (not NAdam) for embed, lm_head, norms,
        biases and the router.
      weight_decay_mask: tree / callable of bools; default `labels.decay_mask` (no decay on
        norms, biases and the embedding).
      shardings: `param_shardings(nnx.state(model, nnx.Param))` when the params are sharded.
      The rest: see `scale_by_muon`.

    Build it over the Params only: `nnx.Optimizer(model, tx, wrt=nnx.Param)`.
    """
    mask = labels_lib.decay_mask if weight_decay_mask is None else weight_decay_mask
    muon_side = optax.chain(
        scale_by_muon(ns_coeffs, ns_steps, beta, eps, nesterov=nesterov,
                      consistent_rms=consistent_rms, dimension_numbers=labels_lib.matrix_dims,
                      ns_dtype=ns_dtype, shardings=shardings),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
    adam_side = optax.adamw(adam_learning_rate if adam_learning_rate is not None
                            else learning_rate, b1=adam_b1, b2=adam_b2, eps=adam_eps,
                            weight_decay=weight_decay, mask=mask)
    return optax.partition({labels_lib.MUON: muon_side, labels_lib.ADAMW: adam_side},
                           labels_lib.param_labels)
