"""The loss head's log-sum-exp: the one-pass Pallas kernel (parcae.model.lse) against XLA's two passes.

  PYTHONPATH=$PWD python bench/lse.py                 # GPU: bf16 logits [chunk, 32768], chunks 2048 / 4096 / 8192
  PYTHONPATH=$PWD python bench/lse.py --smoke         # CPU: tiny shape, interpret mode
  PYTHONPATH=$PWD python bench/lse.py --grad          # the training loss's kernel: lse + logit gradient
  PYTHONPATH=$PWD python bench/lse.py --grad --chunks 8192 --grad-rows 1 --grad-cols 4096 --warps 8 --sustain 5
  PYTHONPATH=$PWD python bench/lse.py --inplace --chunks 8192   # the kernel writing over its logits: same bits?

--grad times, per chunk, the training loss head's elementwise work on the bf16 logits: the log-sum-exp kernel
followed by XLA's gradient fusion (bf16((exp(x - lse) - onehot) * g), the path before `lse.row_lse_grad`)
against the one-read kernel for each launch shape in --grad-rows x --grad-cols x --warps; the kernel's lse
against the first path's and the fraction of gradient entries that differ (by one bf16 rounding at most).

For each chunk: the largest difference of the kernel's result from XLA's formula (float32 summation order
only; logits of std 4 and one row shifted by +80), then ms per call (--iters calls back to back, median of 5)
for XLA and for each launch shape in --rows x --cols x --warps, and the kernel's bandwidth (the bf16 logits read
once). Writes $OUT/lse.json.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from parcae.model import lse
from profiling import sustained, sustained_text  # bench/profiling.py: energy per call at the power limit
from rope_norm import timed  # bench/rope_norm.py: calls back to back, median of 5


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--iters", type=int, default=50)
  p.add_argument("--chunks", default="2048,4096,8192")
  p.add_argument("--vocab", type=int, default=32768)
  p.add_argument("--rows", default="8,16,32")
  p.add_argument("--cols", default="512,1024,2048")
  p.add_argument("--warps", default="4,8")
  p.add_argument("--grad", action="store_true")
  p.add_argument("--grad-rows", default="1,2,4,8")
  p.add_argument("--grad-cols", default="1024,2048,4096")
  p.add_argument("--stages", default="2", help="Triton pipelining depths of the gradient kernel's loops")
  p.add_argument("--hints", default="none", help="--grad: ','-separated L2 hints of the library kernel: none, "
                 "evict, reverse, evict+reverse (lse.GRAD_EVICT / GRAD_REVERSE)")
  p.add_argument("--variants", default="library", help="';'-separated: library, three=False|True,hot=True|False")
  p.add_argument("--sustain", type=float, default=0.0, help="--grad: also time each over this many seconds of "
                 "back-to-back calls, with the GPU's clock, power and energy per call (profiling.sustained)")
  p.add_argument("--inplace", action="store_true", help="check the gradient kernel's in-place bf16 result")
  args = p.parse_args()
  if args.inplace:
    return inplace_main(args)
  if args.grad:
    return grad_main(args)
  if args.smoke:
    args.chunks, args.vocab, args.rows, args.cols, args.warps, args.iters = "64", 2048, "16", "1024", "4", 2
  xla = jax.jit(lambda x: jax.nn.logsumexp(x.astype(jnp.float32), axis=1))
  rows_out = []
  for n in map(int, args.chunks.split(",")):
    x = 4.0 * jax.random.normal(jax.random.key(n), (n, args.vocab), jnp.float32)
    x = x.at[0].add(80.0).astype(jnp.bfloat16)
    want = np.asarray(xla(x))
    t_xla = timed(xla, x, iters=args.iters)
    print(f"chunk {n} x {args.vocab}: xla two-pass {t_xla * 1e3:.4f} ms", flush=True)
    for r, c, w in itertools.product(*(map(int, a.split(",")) for a in (args.rows, args.cols, args.warps))):
      lse.ROWS, lse.MAX_COLS, lse.WARPS = r, c, w
      if not lse.supported(n, args.vocab):
        continue
      f = jax.jit(lse.row_lse)  # a fresh jit per launch shape (the module constants are read at trace time)
      diff = float(np.abs(np.asarray(f(x)) - want).max())
      t = timed(f, x, iters=args.iters)
      gbs = n * args.vocab * 2 / t / 1e9
      print(f"  rows {r:3d} cols {c:5d} warps {w}: {t * 1e3:.4f} ms ({t_xla / t:.2f}x xla, {gbs:.0f} GB/s), "
            f"max |diff| {diff:.2e}", flush=True)
      rows_out.append({"chunk": n, "rows": r, "cols": c, "warps": w, "ms": t * 1e3, "xla_ms": t_xla * 1e3,
                       "gb_s": gbs, "max_abs_diff": diff})
  with open(os.path.join(os.environ.get("OUT", "/tmp"), "lse.json"), "w") as fh:
    json.dump({"device": jax.devices()[0].device_kind, "rows": rows_out}, fh, indent=1)


def _variant_kernel(x_ref, t_ref, d_ref, lse_ref, *, g, cols, three, hot):
  """Candidate gradient kernels (the target logit is gathered outside): `three` = three loops with elementwise
  running max / sum vectors, one cross-thread reduction each (else the library's two loops, max and sum
  reduced per tile); `hot` = the one-hot subtracted in the kernel (else fixed up outside at the targets)."""
  rows, v = x_ref.shape
  t_R = t_ref[...]
  tile = lambda j: x_ref[:, pl.ds(pl.multiple_of(j * cols, cols), cols)].astype(jnp.float32)
  if three:
    mv = jax.lax.fori_loop(0, v // cols, lambda j, mv: jnp.maximum(mv, tile(j)),
                           jnp.full((rows, cols), -jnp.inf, jnp.float32))
    m = jnp.max(mv, axis=1)
    sv = jax.lax.fori_loop(0, v // cols, lambda j, sv: sv + jnp.exp(tile(j) - m[:, None]),
                           jnp.zeros((rows, cols), jnp.float32))
    lse_R = m + jnp.log(jnp.sum(sv, axis=1))
  else:
    def stats(j, carry):
      m, s = carry
      x = tile(j)
      m_new = jnp.maximum(m, jnp.max(x, axis=1))
      return m_new, s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new[:, None]), axis=1)
    m, s = jax.lax.fori_loop(0, v // cols, stats, (jnp.full((rows,), -jnp.inf, jnp.float32),
                                                   jnp.zeros((rows,), jnp.float32)))
    lse_R = m + jnp.log(s)

  def grad(j, _):
    p = jnp.exp(tile(j) - lse_R[:, None])
    if hot:
      col = j * cols + jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
      p = p - (col == t_R[:, None]).astype(jnp.float32)
    d_ref[:, pl.ds(pl.multiple_of(j * cols, cols), cols)] = (p * g).astype(d_ref.dtype)

  jax.lax.fori_loop(0, v // cols, grad, None)
  lse_ref[...] = lse_R


def variant_lse_grad(x, t, g, dtype, *, three, hot, interpret=None):
  """(lse, target logit, d) as lse.row_lse_grad, from `_variant_kernel` plus XLA's gather (and fix-up)."""
  import functools
  from jax.experimental import pallas as pl_
  n, v = x.shape
  cols, r = lse._cols(v, lse.GRAD_COLS), lse.GRAD_ROWS
  interpret, params = lse._backend(interpret, lse.GRAD_WARPS, lse.GRAD_STAGES)
  kern = functools.partial(_variant_kernel, g=float(np.float32(g)), cols=cols, three=three, hot=hot)
  d, lse_n = pl_.pallas_call(
      kern, out_shape=(jax.ShapeDtypeStruct((n, v), dtype), jax.ShapeDtypeStruct((n,), jnp.float32)),
      grid=(n // r,), in_specs=[pl_.BlockSpec((r, v), lambda i: (i, 0)), pl_.BlockSpec((r,), lambda i: (i,))],
      out_specs=(pl_.BlockSpec((r, v), lambda i: (i, 0)), pl_.BlockSpec((r,), lambda i: (i,))),
      interpret=interpret, **params)(x, t.astype(jnp.int32))
  x_t = jnp.take_along_axis(x, t[:, None], axis=1)[:, 0].astype(jnp.float32)
  if not hot:
    d = d.at[jnp.arange(n), t].set(((jnp.exp(x_t - lse_n) - 1.0) * np.float32(g)).astype(dtype))
  return lse_n, x_t, d


def inplace_main(args):
  """`lse.row_lse_grad` writes a bf16 gradient over its bf16 logits (input_output_aliases) and a float32 one
  into a new buffer: the bf16 result must be the float32 one rounded once (the same float32 value before the
  cast), and the log-sum-exps and target logits equal, bit for bit. Run with the logits donated, so the kernel
  works in the logits' own buffer (no copy by XLA), at the training shape [chunk, vocab]."""
  if args.smoke:
    args.chunks, args.vocab = "64", 2048
  g = 1.0 / (8 * 32768)
  rows = []
  for n in map(int, args.chunks.split(",")):
    make = jax.jit(lambda k: (4.0 * jax.random.normal(k, (n, args.vocab))).astype(jnp.bfloat16))
    t = jax.random.randint(jax.random.key(1), (n,), 0, args.vocab)
    wide = jax.jit(lambda x, t: lse.row_lse_grad(x, t, g, jnp.float32))(make(jax.random.key(0)), t)
    inplace = jax.jit(lambda x, t: lse.row_lse_grad(x, t, g, jnp.bfloat16), donate_argnums=0)
    big = f"bf16[{n},{args.vocab}]"
    copies = sum(big in ln and " copy(" in ln for ln in inplace.lower(make(jax.random.key(0)), t).compile()
                 .as_text().splitlines())
    got = inplace(make(jax.random.key(0)), t)
    same = [bool(jnp.array_equal(got[i], wide[i])) for i in (0, 1)]
    d_same = float(jnp.mean(got[2] == wide[2].astype(jnp.bfloat16)))
    print(f"chunk {n} x {args.vocab}: lse equal {same[0]}, target equal {same[1]}, gradient entries equal to "
          f"bf16(float32 path) {d_same:.9f}; copies of the logits in the in-place program: {copies}", flush=True)
    rows.append({"chunk": n, "lse_equal": same[0], "target_equal": same[1], "grad_equal_fraction": d_same,
                 "copies": copies})
  with open(os.path.join(os.environ.get("OUT", "/tmp"), "lse_inplace.json"), "w") as fh:
    json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, fh, indent=1)
  return rows


def grad_main(args):
  if args.smoke:
    args.chunks, args.vocab, args.grad_rows, args.grad_cols, args.warps, args.iters = "64", 2048, "4", "512", "4", 2
  g = 1.0 / (8 * 32768)

  def before(x, t):  # the lse kernel, then XLA's gradient fusion (loss._chunk_grads' formula)
    lse_n = lse.row_lse(x)
    hot = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1) == t[:, None]
    d = ((jnp.exp(x.astype(jnp.float32) - lse_n[:, None]) - hot) * g).astype(jnp.bfloat16)
    return lse_n, jnp.take_along_axis(x, t[:, None], axis=1)[:, 0].astype(jnp.float32), d

  rows_out = []
  for n in map(int, args.chunks.split(",")):
    x = (4.0 * jax.random.normal(jax.random.key(n), (n, args.vocab), jnp.float32)).astype(jnp.bfloat16)
    t = jax.random.randint(jax.random.key(n + 1), (n,), 0, args.vocab)
    f0 = jax.jit(before)
    want = [np.asarray(a, np.float32) for a in f0(x, t)]
    t0 = timed(f0, x, t, iters=args.iters)
    gb = 2 * n * args.vocab * 2 / 1e9  # logits read once, gradient written once
    sustain = lambda fn, sec: sustained(fn, (x, t), max(1, int(args.sustain / sec))) if args.sustain else {}
    s0 = sustain(f0, t0)
    print(f"chunk {n} x {args.vocab}: lse kernel + XLA gradient {t0 * 1e3:.4f} ms" + (sustained_text(s0) if s0 else ""),
          flush=True)
    variants = {"library": None, **{f"three={th},hot={h}": (th, h) for th in (False, True) for h in (True, False)}}
    for (name, var), hint, r, c, w, st in itertools.product(
        [(k, v) for k, v in variants.items() if k in args.variants.split(";")], args.hints.split(","),
        *(map(int, a.split(",")) for a in (args.grad_rows, args.grad_cols, args.warps, args.stages))):
      lse.GRAD_ROWS, lse.GRAD_COLS, lse.GRAD_WARPS, lse.GRAD_STAGES = r, c, w, st
      lse.GRAD_EVICT, lse.GRAD_REVERSE = "evict" in hint, "reverse" in hint
      if var is not None and hint != "none":
        continue  # the hints apply to the library kernel only
      name = name if hint == "none" else f"{name}+{hint}"
      if not lse.grad_supported(n, args.vocab):
        continue
      if var is None:  # fresh jits: the module constants are read when traced
        f = jax.jit(lambda x, t: lse.row_lse_grad(x, t, g, jnp.bfloat16))
      else:
        f = jax.jit(functools.partial(variant_lse_grad, g=g, dtype=jnp.bfloat16, three=var[0], hot=var[1]))
      try:
        got = [np.asarray(a, np.float32) for a in f(x, t)]
        tk = timed(f, x, t, iters=args.iters)
        sk = sustain(f, tk)
      except Exception as e:  # a launch shape that does not compile is reported, not fatal
        print(f"  {name} rows {r} cols {c} warps {w} stages {st}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        continue
      dl = float(np.abs(got[0] - want[0]).max())
      same_t = bool(np.array_equal(got[1], want[1]))
      frac = float((got[2] != want[2]).mean())
      rel = float((np.abs(got[2] - want[2]) / np.maximum(np.abs(want[2]), 1e-30)).max())
      print(f"  {name:22s} rows {r} cols {c:5d} warps {w:2d} stages {st}: {tk * 1e3:.4f} ms ({t0 / tk:.2f}x, {gb / tk:.0f} GB/s); "
            f"lse max |diff| {dl:.1e}, target equal {same_t}, gradient entries differing {frac:.1e} "
            f"(max rel {rel:.1e})" + (sustained_text(sk) if sk else ""), flush=True)
      rows_out.append({"variant": name, "hint": hint, "chunk": n, "rows": r, "cols": c, "warps": w, "stages": st, "ms": tk * 1e3, "before_ms": t0 * 1e3,
                       "gb_s": gb / tk, "lse_diff": dl, "grad_frac_differ": frac, "grad_max_rel": rel,
                       **({"sustained": sk, "before_sustained": s0} if sk else {})})
  with open(os.path.join(os.environ.get("OUT", "/tmp"), "lse_grad.json"), "w") as fh:
    json.dump({"device": jax.devices()[0].device_kind, "rows": rows_out}, fh, indent=1)


if __name__ == "__main__":
  main()
