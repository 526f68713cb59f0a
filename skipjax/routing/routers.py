"""Per-token gates for SkipLayer (Learning to Skip, Zeng et al. 2023, §2.1).

A router maps each token x ∈ R^d to two logits `x @ W_G`, W_G ∈ R^{d×2} (LtS Eq. 3), and a gate
turns the logits into a `Gate`:

  * `mask`      m ∈ {0, 1}: the hard decision (1 = run the layer, 0 = skip it), no gradient;
  * `scale_on`  coefficient of F(x) for routed tokens;
  * `scale_off` coefficient of x for skipped tokens;
  * `probs`     the differentiable probability of routing, used by the capacity loss.

so that a whole-layer SkipLayer computes (LtS Eq. 1 / Eq. 4 generalised)

    y = m · scale_on · F(x) + (1 − m) · scale_off · x            (gate_form 'paper')

or, with `config.model.skip.gate_form='residual'`, y = x + m · scale_on · (F(x) − x) (the
layer's residual scaled by g₁; `routing.gated_layer_output`). A residual block always uses
y = x + m · scale_on · R(x) (`routing.gated_residual`).

Gate kinds (`KINDS`):

  `gumbel`  (default) Straight-Through Gumbel-Softmax (LtS §2.1, Fig. 1b). Forward: the exact
            one-hot sample argmax(logits + Gumbel noise), so `scale_on = m`, `scale_off = 1 − m`
            are exactly 0/1 and y is exactly F(x) or x. Backward: the gradient of the relaxation
            softmax((logits + noise) / temperature); routed tokens send gradient through
            g[1]·F(x), skipped ones through g[0]·x. With `deterministic=True` (eval, decoding,
            LtS Alg. 2) the decision is argmax(logits) without noise.
  `top1`    LtS Eq. 4: g = softmax(logits), m = [argmax g = 1], scale_on = g[1], scale_off = g[0]
            (forward values are scaled by g; gradient reaches W_G through g).
  `sigmoid` p = σ(logit1 − logit0), m = [p > threshold], scale_on = p, scale_off = 1 − p, i.e.
            the sigmoid value scales the output as in Eq. 4. Since σ(l1 − l0) = softmax(l)[1],
            `sigmoid` with threshold 0.5 equals `top1`; the kind exists to move the threshold.
  `random`  the random-gating baseline: m ~ Bernoulli(target_density) per token, scales 1, no
            learning. It samples in deterministic mode too (the baseline *is* random).
  `none`    always on: m = 1, scales 1, probs 1 (a dense layer).
  `highway` HighwayNet baseline (Srivastava et al. 2015; LtS §3): a soft transform
            gate T = σ(logit1 − logit0), m = 1 (nothing is skipped), scale_on = T,
            scale_off = 1 − T, combined by `routing.gated_highway` as the highway form
            y = T·H(x) + (1 − T)·x, where the transform H is the branch output R(x) on a
            residual block (attention / FFN) and the layer's output F(x) at layer granularity.

`probs` is the probability that the token is routed, P(m = 1): softmax(logits)[1] for `gumbel`
(the Gumbel-max sample is 1 with exactly this probability, independent of the temperature),
`top1` and `sigmoid`; the constant P for `random`; 1 for `none`.

Randomness comes from the rng stream 'gate' (`Router`) or an explicit key (`gate_from_logits`).
"""
import math
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jnp.ndarray
PRNGKey = jax.Array

KINDS = ("gumbel", "top1", "sigmoid", "random", "none", "highway")


@flax.struct.dataclass
class Gate:
  """Per-token routing decision; every field has the token shape [...] (LtS Eq. 1/3/4).

  Attributes:
    mask: hard decision m ∈ {0., 1.} (float32, no gradient).
    scale_on: coefficient multiplying F(x) where m = 1.
    scale_off: coefficient multiplying x where m = 0.
    probs: differentiable probability of routing, P(m = 1).
  """
  mask: Array
  scale_on: Array
  scale_off: Array
  probs: Array


@jax.custom_jvp
def straight_through(hard: Array, soft: Array) -> Array:
  """Straight-through estimator: forward value `hard` (bit-exact), tangent/gradient of `soft`.

  Same as `hard + (soft − stop_gradient(soft))` but immune to float reassociation or rounding:
  the primal output is `hard` itself, so e.g. a one-hot sample stays exactly 0/1.
  """
  del soft
  return hard


@straight_through.defjvp
def _straight_through_jvp(primals, tangents):
  hard, _ = primals
  _, soft_dot = tangents
  return hard, soft_dot.astype(hard.dtype)


def _route_bit(logits: Array) -> Array:
  """Hard argmax over the two logits as float {0., 1.}; ties go to 'skip' (index 0)."""
  return (logits[..., 1] > logits[..., 0]).astype(jnp.float32)


def fixed_gate(mask: Array) -> Gate:
  """A gate with a given (non-learned) mask and unit scales: pruning, skip policies, `none`."""
  mask = jax.lax.stop_gradient(jnp.asarray(mask, jnp.float32))
  ones = jnp.ones_like(mask)
  return Gate(mask=mask, scale_on=ones, scale_off=ones, probs=mask)


def always_on_gate(shape) -> Gate:
  """Kind `none`: every token runs the layer (m = 1)."""
  return fixed_gate(jnp.ones(shape, jnp.float32))


def random_gate(rng: PRNGKey, shape, target_density: float) -> Gate:
  """Random-gating baseline (LtS §4): m ~ Bernoulli(P) per token, unit scales, probs = P."""
  mask = jax.random.bernoulli(rng, target_density, shape).astype(jnp.float32)
  ones = jnp.ones_like(mask)
  return Gate(mask=mask, scale_on=ones, scale_off=ones, probs=jnp.full(shape, target_density,
                                                                       jnp.float32))


def top1_gate(logits: Array) -> Gate:
  """LtS Eq. 4: g = softmax(logits), m = [argmax g = 1], y = g[1]·F(x) or g[0]·x."""
  g = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return Gate(mask=_route_bit(logits), scale_on=g[..., 1], scale_off=g[..., 0], probs=g[..., 1])


def sigmoid_gate(logits: Array, threshold: float = 0.5) -> Gate:
  """LtS §2.1 sigmoid router: p = σ(l1 − l0), m = [p > threshold], scales p and 1 − p (Eq. 4)."""
  logits = logits.astype(jnp.float32)
  p = jax.nn.sigmoid(logits[..., 1] - logits[..., 0])
  mask = jax.lax.stop_gradient((p > threshold).astype(jnp.float32))
  return Gate(mask=mask, scale_on=p, scale_off=1.0 - p, probs=p)


def gumbel_gate(logits: Array, rng: Optional[PRNGKey], temperature: float = 1.0,
                deterministic: bool = False) -> Gate:
  """LtS §2.1 Straight-Through Gumbel-Softmax: forward one-hot sample, backward the relaxation.

  Training: z = logits + Gumbel(0, 1) noise; hard = one_hot(argmax z); soft = softmax(z / τ);
  g = straight_through(hard, soft), i.e. g is exactly one-hot forward and ∂g = ∂soft backward.
  Deterministic (eval / decoding, LtS Alg. 2): z = logits, no noise.
  """
  logits = logits.astype(jnp.float32)
  if deterministic:
    z = logits
  else:
    if rng is None:
      raise ValueError("gumbel gate needs an rng unless deterministic=True")
    z = logits + jax.random.gumbel(rng, logits.shape, jnp.float32)
  route = _route_bit(z)
  hard = jnp.stack([1.0 - route, route], axis=-1)
  soft = jax.nn.softmax(z / temperature, axis=-1)
  g = straight_through(hard, soft)
  probs = jax.nn.softmax(logits, axis=-1)[..., 1]
  return Gate(mask=route, scale_on=g[..., 1], scale_off=g[..., 0], probs=probs)


def gate_from_logits(logits: Array, kind: str = "gumbel", *, rng: Optional[PRNGKey] = None,
                     deterministic: bool = False, temperature: float = 1.0,
                     threshold: float = 0.5, target_density: float = 0.5) -> Gate:
  """LtS Eq. 3: turn router logits [..., 2] into a `Gate` of token shape [...].

  Args:
    logits: router logits x @ W_G (+ b), last axis (skip, route).
    kind: one of `KINDS`.
    rng: PRNG key; required by `random`, and by `gumbel` unless `deterministic`.
    deterministic: `gumbel` uses argmax without noise (other kinds ignore it).
    temperature: Gumbel-Softmax relaxation temperature τ (`gumbel` only).
    threshold: routing threshold on σ(l1 − l0) (`sigmoid` only).
    target_density: P, the Bernoulli rate of `random`.
  """
  shape = logits.shape[:-1]
  if kind == "gumbel":
    return gumbel_gate(logits, rng, temperature, deterministic)
  if kind == "top1":
    return top1_gate(logits)
  if kind == "sigmoid":
    return sigmoid_gate(logits, threshold)
  if kind == "random":
    if rng is None:
      raise ValueError("random gate needs an rng")
    return random_gate(rng, shape, target_density)
  if kind == "none":
    return always_on_gate(shape)
  if kind == "highway":
    return highway_gate(logits)
  raise ValueError(f"unknown router kind {kind!r}; known: {KINDS}")


def highway_gate(logits: Array) -> Gate:
  """Srivastava et al. 2015: T = σ(l1 − l0) for y = T·H(x) + (1 − T)·x (`gated_highway`);
  every token computes H (R(x) on a residual block, F(x) for a whole layer)."""
  t = jax.nn.sigmoid(logits[..., 1] - logits[..., 0])
  return Gate(mask=jnp.ones_like(t), scale_on=t, scale_off=1.0 - t, probs=t)


def needs_rng(kind: str, deterministic: bool) -> bool:
  """Whether a gate of this kind draws from the 'gate' rng stream."""
  return kind == "random" or (kind == "gumbel" and not deterministic)


def density_bias_init(target_density: float) -> Callable[..., Array]:
  """Bias init [0, logit(P)]: with a small kernel the router starts routing ≈ P of the tokens.

  For `gumbel` the initial routing probability is exactly σ(logit P) = P at zero kernel, so the
  capacity loss starts near 0 and the compute budget holds from step 0.
  """
  p = min(max(float(target_density), 1e-4), 1.0 - 1e-4)
  route_logit = math.log(p / (1.0 - p))

  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.zeros(shape, dtype).at[..., 1].set(route_logit)

  return init


class Router(nn.Module):
  """SkipLayer router (LtS Eq. 3): logits = x @ W_G + b, W_G ∈ R^{d×2}, then a `Gate`.

  Every kind owns the same parameters (`kernel` [d, 2] with logical axes ('embed', None) and,
  with `use_bias`, `bias` [2]) so checkpoints and sharding rules do not depend on the kind;
  `random` and `none` simply do not use them (their gradient is zero).

  Attributes:
    kind: one of `KINDS`.
    temperature: Gumbel-Softmax temperature τ.
    threshold: `sigmoid` routing threshold.
    target_density: P; used by `random` and by the bias init.
    init_density: the density the bias init routes, when it differs from P (the start of a
      density warm-up, `scheduled_density`, with `skip.router_bias_init='warmup'`).
    dtype: dtype of the logits matmul (the gate math itself always runs in float32).
    use_bias: learn a bias initialised to [0, logit(P)] (see `density_bias_init`).
    kernel_init: init of W_G (small, so routing starts input-independent).
  """
  kind: str = "gumbel"
  temperature: float = 1.0
  threshold: float = 0.5
  target_density: float = 0.5
  init_density: Optional[float] = None
  dtype: Any = jnp.float32
  use_bias: bool = True
  kernel_init: Callable[..., Array] = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = False,
               target_density: Optional[Array] = None) -> Gate:
    """Gate for every token of x [..., d]; draws from rng stream 'gate' when the kind needs it.

    `target_density` (a scalar, possibly traced) replaces P for `random` during a density warm-up.
    """
    if self.kind not in KINDS:
      raise ValueError(f"unknown router kind {self.kind!r}; known: {KINDS}")
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, ("embed", None)),
                        (x.shape[-1], 2), jnp.float32)
    logits = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          density_bias_init(self.init_density or self.target_density), (None,)), (2,), jnp.float32)
      logits = logits + bias.astype(self.dtype)
    rng = self.make_rng("gate") if needs_rng(self.kind, deterministic) else None
    return gate_from_logits(logits.astype(jnp.float32), self.kind, rng=rng,
                            deterministic=deterministic, temperature=self.temperature,
                            threshold=self.threshold,
                            target_density=self.target_density if target_density is None else target_density)
