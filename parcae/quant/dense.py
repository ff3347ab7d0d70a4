"""Quantized dense GEMM with separate forward / dgrad / wgrad quantization (jax.custom_vjp).

y = x @ w with x [..., K], w [K, N]. For a recipe, each of the three GEMMs
  fwd   y  = Q(x) @ Q(w)          blocks along K
  dgrad dx = Q(g) @ Q(w)^T        blocks along N
  wgrad dw = Q(x)^T @ Q(g)        blocks along M (tokens)
quantizes its two operands with its own settings, optionally after rotating both along the
contraction axis by the same block Hadamard (which cancels in the product).

Key use (key split into 8): 0 fwd x, 1 fwd w, 2 dgrad g, 3 dgrad w, 4 wgrad x, 5 wgrad g
(stochastic rounding), 6 dgrad signs, 7 wgrad signs (random-sign Hadamard).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from parcae import compile_target
from parcae.quant import hadamard as H
from parcae.quant import quantize as Q
from parcae.quant import scalesearch as S
from parcae.quant.kernels import rotq, unrot


@dataclasses.dataclass(frozen=True)
class Operand:
  fmt: str
  scale_mode: str = "floor"
  rounding: str = "nearest"  # nearest | stochastic
  two_level: bool = True  # nvfp4: FP32 tensor scale
  block_2d: bool = False  # nvfp4: 16x16 tiles (weights)
  search: bool = False  # ScaleSearch block scales (nearest rounding only)


@dataclasses.dataclass(frozen=True)
class Gemm:
  lhs: Operand | None  # None: operand used as is (high precision, or reused forward-quantized)
  rhs: Operand | None
  rotation: int = 0  # block Hadamard size along the contraction axis; 0 = none
  signs: str = "none"  # none | random (re-drawn per call from the key) | te (fixed TE vector)


@dataclasses.dataclass(frozen=True)
class Recipe:
  fwd: Gemm
  dgrad: Gemm
  wgrad: Gemm
  bwd_source: str = "hp"  # hp: backward re-quantizes x, w from high precision | fwdq: from Q(x), Q(w)
  clip_mask: bool = False  # zero the gradient of entries the forward quantizer clipped (QuEST)


def _uniform(op):
  return Gemm(op, op), Gemm(op, op), Gemm(op, op)


_MXFP4 = Operand("mxfp4")
_NV = Operand("nvfp4")
_NV_SR = Operand("nvfp4", rounding="stochastic")
_Q_FWD = Operand("mxfp4", scale_mode="rms")
_Q_BWD = Operand("mxfp4", scale_mode="headroom", rounding="stochastic")
RECIPE_TABLE = {
    "bf16": None,
    "mxfp8": Recipe(*_uniform(Operand("mxfp8_e4m3", scale_mode="rceil"))),
    "mxfp4": Recipe(*_uniform(_MXFP4)),
    "nvfp4": Recipe(*_uniform(_NV)),
    "nvfp4_scalesearch": Recipe(Gemm(Operand("nvfp4", search=True), Operand("nvfp4", search=True)),
                                Gemm(_NV, _NV), Gemm(_NV, _NV)),
    "quartet": Recipe(Gemm(_Q_FWD, _Q_FWD, rotation=32),
                      Gemm(_Q_BWD, _Q_BWD, rotation=32, signs="random"),
                      Gemm(_Q_BWD, _Q_BWD, rotation=32, signs="random"),
                      bwd_source="fwdq", clip_mask=True),
    "nvidia_nvfp4": Recipe(Gemm(_NV, Operand("nvfp4", block_2d=True)),
                           Gemm(_NV_SR, None),  # reuses the 2-D-quantized forward weight
                           Gemm(_NV, _NV_SR, rotation=16, signs="te")),
}
RECIPES = tuple(RECIPE_TABLE)


IMPLS = ("auto", "jnp", "pallas")  # auto: pallas on a GPU, jnp elsewhere (the Triton kernels are GPU-only)


def resolve_impl(impl: str) -> str:
  """"auto" -> "pallas" when tracing for a GPU, else "jnp"; "jnp" / "pallas" as given."""
  if impl not in IMPLS:
    raise ValueError(f"impl {impl!r} is not valid; use one of {IMPLS}")
  if impl == "auto":
    return "pallas" if compile_target.platform() == "gpu" else "jnp"
  return impl


def quant_spec(recipe: str, impl: str = "jnp") -> str:
  """The string a model's Linear layers carry: the recipe, with "@IMPL" when impl is not jnp ("bf16" stays
  "bf16": no quantizer runs, and the model then takes its plain path and draws no quantization keys)."""
  return recipe if impl == "jnp" or recipe == "bf16" else f"{recipe}@{impl}"


def parse_spec(spec: str, impl: str = "jnp") -> tuple[str, str]:
  """"quartet@pallas" -> ("quartet", "pallas"); a bare recipe keeps `impl`."""
  recipe, _, suffix = spec.partition("@")
  impl = suffix or impl
  if impl not in IMPLS:
    raise ValueError(f"impl {impl!r} is not valid; use one of {IMPLS}")
  return recipe, impl


def validate_recipe(name: str) -> str:
  recipe = parse_spec(name)[0]
  if recipe not in RECIPE_TABLE:
    raise ValueError(f"unknown quantization recipe {recipe!r}; recipe must be one of {RECIPES}")
  return name


# Mesh axes that split the token rows of activations and gradients (the trainer's batch axes,
# parcae.train.mesh). Under jax.set_mesh with these axes, the Pallas path runs per device on its rows
# (shard_map): XLA cannot partition a custom kernel call and would gather the whole operand onto every
# device and quantize all of it there.
ROW_AXES = ("data", "fsdp")


def _row_axes(rows):
  """The mesh axes (of ROW_AXES, size > 1) that split `rows` token rows here, and their device count."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return (), 1
  axes = tuple(a for a in ROW_AXES if a in mesh.axis_names and mesh.shape[a] > 1
               and a not in mesh.manual_axes)  # a caller's shard_map: rows already local
  n = 1
  for a in axes:
    n *= mesh.shape[a]
  return (axes, n) if axes and rows % n == 0 else ((), 1)


def _pallas_operand(x, op: Operand, axis, key, rotation, want_mask, tokens, act):
  """rotq on the whole operand, or (token rows under a batch-sharded mesh) on each device's rows."""
  kw = dict(scale_mode=op.scale_mode, rounding=op.rounding, key=key, rotation=rotation,
            two_level=op.two_level, want_mask=want_mask, act=act)
  axes, n = _row_axes(x.shape[0]) if tokens else ((), 1)
  local = (x.shape[0] // n, x.shape[1])
  if not axes or not rotq.supported(jax.ShapeDtypeStruct(local, x.dtype), op.fmt, axis, rotation,
                                    rounding=op.rounding):
    return rotq.rotate_quantize(x, op.fmt, axis, **kw)
  inputs = rotq.operand_inputs(x, op.fmt, op.rounding, key, rotation, op.two_level, axis, act)  # whole operand
  spec = P(axes, None)

  def shard(xs, consts, sd):
    first = jax.lax.axis_index(axes).astype(jnp.uint32) * jnp.uint32(local[0])
    y, m = rotq.rotate_quantize(xs, op.fmt, axis, inputs=(consts, sd), first_row=first,
                                total_rows=x.shape[0], **kw)
    return (y, m) if want_mask else (y, jnp.zeros((), jnp.int8))

  out_specs = (spec, spec if want_mask else P())
  y, m = jax.shard_map(shard, in_specs=(spec, P(), P()), out_specs=out_specs, axis_names=set(axes),
                       check_vma=False)(x, *inputs)
  return y, m if want_mask else None


def quantize_operand(x, op: Operand | None, axis: int, key, *, rotation=None, want_mask=False, impl="jnp",
                     tokens=False, act=None):
  """Apply the elementwise `act` (or None), rotate (rotation = (n, signs) or None) and quantize one GEMM
  operand along `axis` (its contraction axis) -> (operand, clip mask or None). impl "pallas": one kernel
  pass where `kernels.rotq` handles the operand (2-D, rotation size = block size; act evaluated on each
  loaded tile), else the jnp path; "auto": "pallas" on a GPU. tokens: axis 0 of x is the token axis
  (x, g; not w), split over ROW_AXES."""
  if op is None:
    return _rot(Q.activate(x, act), rotation, axis), None
  if resolve_impl(impl) == "pallas" and rotq.supported(x, op.fmt, axis, rotation, op.block_2d, op.search,
                                                       op.rounding):
    return _pallas_operand(x, op, axis, key, rotation, want_mask, tokens, act)  # mask: int8
  x = _rot(Q.activate(x, act), rotation, axis)
  if op.search:
    return S.quantize_dequantize_search(x, op.fmt, axis=axis, two_level=op.two_level,
                                        block_2d=op.block_2d), None
  f, ax = Q.check_args(x, op.fmt, axis, op.scale_mode, op.rounding, key, op.block_2d)
  y, t = Q._qdq_jnp(x, f, ax, op.scale_mode, op.rounding, key, None,  # pylint: disable=protected-access
                    op.two_level, op.block_2d)
  return y, (jnp.abs(t) < f.elem.max_val) if want_mask else None


def _rotation(g: Gemm, key):
  """(size, signs) of the GEMM's block Hadamard, or None."""
  if not g.rotation:
    return None
  signs = {"none": None, "te": H.TE_SIGNS_16 if g.rotation == 16 else None,
           "random": H.random_signs(key, g.rotation) if g.signs == "random" else None}[g.signs]
  return g.rotation, signs


def _rot(x, r, axis, inverse=False):
  return x if r is None else H.rotate(x, r[0], r[1], axis, inverse)


def _gemm(a, b, g: Gemm, a_axis, b_axis, keys, m, cd, dims, impl, b_tokens, a_act=None):
  """Rotate a, b along their contraction axes, quantize them, contract in compute dtype. a's rows are
  tokens (g or x; a_act: the elementwise function to apply to a first); b's are tokens when b_tokens
  (g in wgrad; not w in dgrad)."""
  aq = quantize_operand(a, g.lhs, a_axis, keys[0], rotation=m, impl=impl, tokens=True, act=a_act)[0]
  bq = quantize_operand(b, g.rhs, b_axis, keys[1], rotation=m, impl=impl, tokens=b_tokens)[0]
  return jax.lax.dot_general(aq.astype(cd), bq.astype(cd), (dims, ((), ())))


def _forward(recipe: Recipe, cd, impl, act, x, w, key, residuals=True):
  """y and (residuals=True, under differentiation) what the backward reads. Without residuals (the primal:
  no-grad loop iterations, evaluation) the kernels write no clip masks."""
  keys = jax.random.split(key, 8)
  r = recipe.fwd
  m = _rotation(r, None)
  keep = recipe.clip_mask and residuals  # boolean masks (1 byte per entry) for the backward
  xq, mx = quantize_operand(x, r.lhs, 1, keys[0], rotation=m, want_mask=keep, impl=impl, tokens=True, act=act)
  wq, mw = quantize_operand(w, r.rhs, 0, keys[1], rotation=m, want_mask=keep, impl=impl)
  y = jnp.dot(xq.astype(cd), wq.astype(cd))
  fwdq = recipe.bwd_source == "fwdq"  # keep only the residuals the backward reads
  # x itself only when the backward re-quantizes it or differentiates act at it; else an empty array of its
  # dtype (the gradient's)
  xr = x if not fwdq or act is not None else jnp.zeros((0,), x.dtype)
  return y, (xr, w, xq if fwdq else None, wq if fwdq or recipe.dgrad.rhs is None else None, mx, mw, key)


def _backward(recipe: Recipe, cd, impl, act, res, g):
  x, w, xq, wq, mx, mwk, key = res
  keys = jax.random.split(key, 8)
  m_fwd = _rotation(recipe.fwd, None)
  xs_act = None  # the elementwise act still to apply to the wgrad operand (in its quantizer)
  if recipe.bwd_source == "fwdq":
    xs, ws = xq, wq
  elif m_fwd is None:
    xs, ws, xs_act = x, w, act
  else:
    xs, ws = _rot(Q.activate(x, act), m_fwd, 1), _rot(w, m_fwd, 0)
  if recipe.dgrad.rhs is None:  # reuse the forward-quantized weight as is
    ws = wq
  md, mw = _rotation(recipe.dgrad, keys[6]), _rotation(recipe.wgrad, keys[7])
  dx = _gemm(g, ws, recipe.dgrad, 1, 1, keys[2:4], md, cd, ((1,), (1,)), impl, False)  # [M, K]
  dw = _gemm(xs, g, recipe.wgrad, 0, 0, keys[4:6], mw, cd, ((0,), (0,)), impl, True, xs_act)  # [K, N]
  dx = _token_grad(dx, mx if recipe.clip_mask else None, x, m_fwd, act, impl)
  if recipe.clip_mask and mwk is not None:
    dw = jnp.where(mwk != 0, dw, 0)
  dw = _rot(dw.astype(jnp.float32), m_fwd, 0, inverse=True)
  return dx, dw.astype(w.dtype), None


def _token_grad(dr, mask, x, rotation, act, impl):
  """x's gradient from the dgrad GEMM's output dr: clip mask, inverse rotation, act's derivative (act's
  own vjp: a custom rule is honoured). One kernel pass on a GPU for rotated recipes (`kernels.unrot`,
  per device under a batch-sharded mesh), else the same steps in jnp."""
  if rotation is None or resolve_impl(impl) != "pallas" or not unrot.supported(dr, rotation[0]):
    return unrot.reference(dr, mask, x, rotation, act)
  fn = lambda dr, mask, x: unrot.unrotate(dr, mask, x, rotation, act)
  axes, n = _row_axes(dr.shape[0])
  if not axes or not unrot.supported(jax.ShapeDtypeStruct((dr.shape[0] // n, dr.shape[1]), dr.dtype),
                                     rotation[0]):
    return fn(dr, mask, x)
  spec = lambda a: P() if a is None or a.ndim < 2 else P(axes, None)
  return jax.shard_map(fn, in_specs=(spec(dr), spec(mask), spec(x)), out_specs=P(axes, None),
                       axis_names=set(axes), check_vma=False)(dr, mask, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _qdot2(recipe, cd, impl, act, x, w, key):
  return _forward(recipe, cd, impl, act, x, w, key, residuals=False)[0]


_qdot2.defvjp(_forward, _backward)


def qdot(x, w, recipe: str, *, key=None, compute_dtype=jnp.bfloat16, impl="jnp", act=None):
  """x [..., K] @ w [K, N] -> [..., N] in compute_dtype, with the named recipe's quantization.

  "bf16" is exactly jnp.dot(x.astype(cd), w.astype(cd)) (values and gradients). key: PRNG key for
  stochastic rounding / random Hadamard signs; None -> a fixed key (deterministic).
  act: None or an elementwise function (a hashable callable, e.g. the MLP's ReLU^2): qdot(x, w, act=f) is
  qdot(f(x), w) in values and gradients, with f evaluated inside x's quantize kernel (f(x) is never
  written to memory, and the backward keeps x, not f(x)).
  impl: "jnp" (XLA-fused quantizers), "pallas" (one-pass rotate + quantize kernels where they
  apply; the same values, except that Quartet's RMS block scales may sum in another order) or
  "auto" (pallas on a GPU, jnp elsewhere); a recipe spelled "NAME@IMPL" (`quant_spec`, what the
  model's layers carry) selects it too.
  """
  recipe, impl = parse_spec(validate_recipe(recipe), impl)
  rec = RECIPE_TABLE[recipe]
  cd = jnp.dtype(compute_dtype)
  if rec is None:
    return jnp.dot((x if act is None else act(x)).astype(cd), w.astype(cd))
  if w.ndim != 2 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"qdot needs x [..., K] and w [K, N]; got x {x.shape}, w {w.shape}")
  key = jax.random.key(0) if key is None else key
  x2 = x.reshape(-1, x.shape[-1])
  if act is not None and jax.eval_shape(act, x2).shape != x2.shape:
    raise ValueError(f"act must be elementwise (same shape out as in); {act} maps {x2.shape} to "
                     f"{jax.eval_shape(act, x2).shape}")
  y = _qdot2(rec, cd, impl, act, x2, w, key)
  return y.reshape(x.shape[:-1] + (w.shape[1],))
