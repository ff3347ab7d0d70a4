"""A candidate Mosaic GPU kernel for the training loss's log-sum-exp and logit gradient, each row kept in
shared memory between its passes: every logit read from HBM once, the second pass reading shared memory
instead of L2 (the library kernel `parcae.model.lse.row_lse_grad` is Pallas Triton and re-reads its tiles
from L2).

  PYTHONPATH=$PWD python3 bench/lse_smem.py                    # H100 / H200: check, then time, [8192, 32768]
  PYTHONPATH=$PWD python3 bench/lse_smem.py --buffers 2,3 --slices 2048,4096 --lookahead 1,2 --alias 0,1

Per CTA (one per SM, persistent, one warpgroup): the rows p, p + P, p + 2P, ... (P programs), through a ring of
BUFFERS row buffers [V / 256, 256] bf16 (64 KB at V = 32768). Row k + LOOKAHEAD's TMA load is issued before row
k's math, into the buffer whose TMA store has finished reading it (at most BUFFERS - LOOKAHEAD - 1 stores still
reading). Row k's math, SLICE logits at a time (each thread 8 contiguous bf16 per vector, the warpgroup-strided
layout):
  1. m = max(x): elementwise in bf16 over the slices (exact), one warpgroup reduction;
  2. s = sum(exp(x - m)) in float32, elementwise over the slices, one reduction; lse = m + log(s);
     the target logit x[t] read from shared memory;
  3. d = bf16(exp(x - lse) * g) written over the logits in shared memory, then the target's entry
     bf16((exp(x[t] - lse) - 1) * g); one TMA store of the buffer to d's row.
Each logit is exponentiated twice (passes 2 and 3), as in the Triton kernel; pass 1 costs no exponential.
lse and the target logit are stored per row as scalars. With ALIAS the kernel runs through pl.pallas_call with
d written over x (`input_output_aliases`, as the library kernel does: a program reads each row whole before
writing it); else through plgpu.kernel (a new [N, V] buffer).

main(): on a GPU, the kernel against `lse.row_lse_grad` on bf16 logits [chunk, 32768] (4 x normal, row 0
shifted by +80) and random targets: lse max |diff|, target logits equal, the fraction of gradient entries
that differ and their largest relative difference; then ms per chunk of both (bench/rope_norm.py's `timed`:
--iters calls back to back, median of 5) and GB/s (logits read once + gradient written once), the copies of the
logits in each compiled program (an aliased d over a non-donated x: one), and "chained": --iters calls in one
jitted loop, each call's gradient the next one's logits (in place where aliased: the training step's case).
Writes $OUT/lse_smem.json.
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
from jax import lax

LANES = 256  # a row in shared memory is [V / LANES, LANES]: TMA copies <= 256 elements along each dimension
VEC = 8      # bf16 per thread and vector (16-byte shared-memory loads and stores)
SMEM_LIMIT = 227 * 1024  # an H100 / H200 CTA's shared memory (opt-in maximum)
REDUCTION_SCRATCH = 128 * 4 * 4  # Mosaic GPU's default scratch for cross-warp reductions (CompilerParams)

# Launch knobs (main() sweeps them): row buffers in shared memory, rows loaded ahead of the one in the math,
# logits per slice of the passes (a multiple of 128 threads x VEC dividing V), exp / log as ex2 / lg2.approx (the
# Triton kernel's exp is ex2.approx too), d written over x (pl.pallas_call with input_output_aliases).
BUFFERS, LOOKAHEAD, SLICE = 3, 1, 4096
APPROX, ALIAS = True, False


def smem_bytes(v: int, buffers: int | None = None) -> int:
  """Shared memory of one CTA: the row buffers, their barriers and the reduction scratch."""
  return (buffers or BUFFERS) * v * 2 + 8 * (buffers or BUFFERS) + REDUCTION_SCRATCH


def check(n: int, v: int, x_dtype=jnp.bfloat16, dtype=jnp.bfloat16):
  """Raise a ValueError naming the knob or shape the kernel cannot run with (None when it can)."""
  if jnp.dtype(x_dtype) != jnp.bfloat16 or jnp.dtype(dtype) != jnp.bfloat16:
    raise ValueError(f"lse_smem: bf16 logits and a bf16 gradient only (it is formed in the logits' shared-memory "
                     f"buffer); got {jnp.dtype(x_dtype)} -> {jnp.dtype(dtype)}")
  if v % LANES or v // LANES > 256:
    raise ValueError(f"lse_smem: the vocabulary must be a multiple of {LANES} and at most {256 * LANES} "
                     f"(one TMA box per row); got V = {v}")
  if SLICE % LANES or SLICE % (128 * VEC) or v % SLICE:
    raise ValueError(f"lse_smem.SLICE = {SLICE}: must be a multiple of {LANES} and of {128 * VEC} "
                     f"(a warpgroup's vectors) and divide V = {v}")
  if not 1 <= LOOKAHEAD < BUFFERS:
    raise ValueError(f"lse_smem: LOOKAHEAD = {LOOKAHEAD} rows ahead needs 1 <= LOOKAHEAD < BUFFERS = {BUFFERS} "
                     "(one buffer holds the row in the math)")
  if smem_bytes(v) > SMEM_LIMIT:
    raise ValueError(f"lse_smem: BUFFERS = {BUFFERS} rows of V = {v} bf16 take {smem_bytes(v)} bytes of shared "
                     f"memory, over the CTA's {SMEM_LIMIT}; use fewer buffers")
  if n < 1:
    raise ValueError(f"lse_smem: no rows (N = {n})")


def _strided(rows):
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  return plgpu.Layout.WG_STRIDED((rows, LANES), vec_size=VEC)


def _row_math(buf_CxL, t, g):
  """Passes 1-3 over one row in shared memory (see the module docstring): the gradient written over the row;
  returns (lse, target logit), float32 scalars."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  c, sr = buf_CxL.shape[0], SLICE // LANES
  layout = _strided(sr)
  at = lambda j: buf_CxL.at[pl.ds(pl.multiple_of(j * sr, sr), sr)]
  part = lambda j: plgpu.load(at(j), (), layout=layout)
  fill = lambda value, dt: plgpu.layout_cast(jnp.full((sr, LANES), value, dt), layout)

  m_vec = lax.fori_loop(0, c // sr, lambda j, mv: jnp.maximum(mv, part(j)), fill(-jnp.inf, jnp.bfloat16))
  m = jnp.max(m_vec.astype(jnp.float32))
  s_vec = lax.fori_loop(0, c // sr, lambda j, sv: sv + jnp.exp(part(j).astype(jnp.float32) - m),
                        fill(0.0, jnp.float32))
  lse = m + jnp.log(jnp.sum(s_vec))
  hi, lo = lax.div(t, LANES), lax.rem(t, LANES)
  x_t = buf_CxL[hi, lo].astype(jnp.float32)

  def grad(j, carry):
    at(j)[...] = (jnp.exp(part(j).astype(jnp.float32) - lse) * g).astype(jnp.bfloat16)
    return carry

  lax.fori_loop(0, c // sr, grad, 0)
  buf_CxL[hi, lo] = ((jnp.exp(x_t - lse) - 1.0) * g).astype(jnp.bfloat16)
  return lse, x_t


def _kernel(x_ref, t_ref, d_ref, lse_ref, tgt_ref, buf_BxCxL, bars, *, g, n, programs, pid):
  """One program's rows pid, pid + programs, ... through the ring of row buffers."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  p = pid()
  count = lax.div(n - p + programs - 1, programs)
  row = lambda k: p + k * programs

  def load(k):
    slot = lax.rem(k, BUFFERS)
    plgpu.copy_gmem_to_smem(x_ref.at[row(k)], buf_BxCxL.at[slot], bars.at[slot])

  for k in range(LOOKAHEAD):
    pl.when(k < count)(functools.partial(load, k))

  def step(k, carry):
    @pl.when(k + LOOKAHEAD < count)
    def _():  # the buffer of row k + LOOKAHEAD - BUFFERS: wait until its store has read it
      plgpu.wait_smem_to_gmem(BUFFERS - LOOKAHEAD - 1, wait_read_only=True)
      load(k + LOOKAHEAD)

    r, slot = row(k), lax.rem(k, BUFFERS)
    t = t_ref[r]
    plgpu.barrier_wait(bars.at[slot])
    lse, x_t = _row_math(buf_BxCxL.at[slot], t, g)
    lse_ref[r] = lse
    tgt_ref[r] = x_t
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(buf_BxCxL.at[slot], d_ref.at[r])
    return carry

  lax.fori_loop(0, count, step, 0)
  plgpu.wait_smem_to_gmem(0)


def _programs() -> int:
  from parcae.model import mlp_kernels as mk  # pylint: disable=g-import-not-at-top
  return mk._num_sms()  # pylint: disable=protected-access


def row_lse_grad_smem(x_NxV, t_N, g: float, dtype=jnp.bfloat16):
  """(lse [N], target logit [N], d [N, V]) as `lse.row_lse_grad` computes them, for bf16 logits x and int
  targets t: lse = log(sum(exp(x))) per row in float32, the target's logit x[i, t_i] in float32 and
  d = bf16((exp(x - lse) - onehot(t)) * g), each logit read from HBM once (the row kept in shared memory).
  One device's whole rows (no mesh handling)."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  n, v = x_NxV.shape
  check(n, v, x_NxV.dtype, dtype)
  c, programs = v // LANES, min(_programs(), n)
  x_NxCxL = x_NxV.reshape(n, c, LANES)
  vec = jax.ShapeDtypeStruct((n,), jnp.float32)
  out = (jax.ShapeDtypeStruct((n, c, LANES), jnp.bfloat16), vec, vec)
  scratch = [plgpu.SMEM((BUFFERS, c, LANES), jnp.bfloat16), plgpu.Barrier(num_barriers=BUFFERS)]
  params = plgpu.CompilerParams(approx_math=APPROX)
  body = functools.partial(_kernel, g=float(np.float32(g)), n=n, programs=programs)
  if ALIAS:
    gmem = pl.BlockSpec(memory_space=plgpu.GMEM)
    d, lse, tgt = pl.pallas_call(
        functools.partial(body, pid=lambda: pl.program_id(0)), out_shape=out, grid=(programs,),
        in_specs=[gmem, gmem], out_specs=(gmem, gmem, gmem), scratch_shapes=scratch, compiler_params=params,
        input_output_aliases={0: 0})(x_NxCxL, t_N.astype(jnp.int32))
  else:
    d, lse, tgt = plgpu.kernel(
        functools.partial(body, pid=lambda: lax.axis_index("sm")), out_type=out, scratch_types=scratch,
        grid=(programs,), grid_names=("sm",), compiler_params=params)(x_NxCxL, t_N.astype(jnp.int32))
  return lse, tgt, d.reshape(n, v)


# ------------------------------------------------------------------------------------------------ bench

def compare(got, want):
  """lse max |diff|, target logits equal, fraction of gradient entries differing and their max relative
  difference: (got, want) as (lse, target, d) triples."""
  got = [np.asarray(a, np.float32) for a in got]
  want = [np.asarray(a, np.float32) for a in want]
  differ = got[2] != want[2]
  rel = np.abs(got[2] - want[2])[differ] / np.maximum(np.abs(want[2][differ]), 1e-30)
  return {"lse_diff": float(np.abs(got[0] - want[0]).max()), "target_equal": bool(np.array_equal(got[1], want[1])),
          "grad_frac_differ": float(differ.mean()), "grad_max_rel": float(rel.max()) if rel.size else 0.0}


def copies(f, x, t):
  """Copies of the logits in f's compiled program (an aliased output over a non-donated x costs one)."""
  n, v = x.shape
  shapes = (f"bf16[{n},{v}]", f"bf16[{n},{v // LANES},{LANES}]")
  return sum(any(s in ln for s in shapes) and " copy(" in ln for ln in f.lower(x, t).compile().as_text().splitlines())


def chained(f, x, t, calls, timed):
  """Seconds per call of f with its gradient fed back as the next call's logits, `calls` calls in one jitted
  loop: an aliased gradient is written in place (one copy of x per loop, not per call)."""
  loop = jax.jit(lambda x, t: lax.fori_loop(0, calls, lambda i, x: f(x, t)[2], x))
  return timed(loop, x, t, iters=2) / calls


def _case(n, v):
  x = 4.0 * jax.random.normal(jax.random.key(n), (n, v), jnp.float32)
  x = x.at[0].add(80.0).astype(jnp.bfloat16)
  return x, jax.random.randint(jax.random.key(n + 1), (n,), 0, v)


def main():
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from rope_norm import timed  # pylint: disable=g-import-not-at-top  # bench/rope_norm.py: back to back, median of 5
  from parcae.model import lse as lib  # pylint: disable=g-import-not-at-top
  global BUFFERS, LOOKAHEAD, SLICE, ALIAS  # pylint: disable=global-statement
  p = argparse.ArgumentParser()
  p.add_argument("--iters", type=int, default=50)
  p.add_argument("--chunks", default="8192")
  p.add_argument("--vocab", type=int, default=32768)
  p.add_argument("--buffers", default=str(BUFFERS))
  p.add_argument("--lookahead", default=str(LOOKAHEAD))
  p.add_argument("--slices", default=str(SLICE), help="logits per slice of the passes (SLICE)")
  p.add_argument("--alias", default=str(int(ALIAS)), help="0: plgpu.kernel, new d; 1: pallas_call, d over x")
  args = p.parse_args()
  g = 1.0 / (8 * 32768)
  rows = []
  for n in map(int, args.chunks.split(",")):
    x, t = _case(n, args.vocab)
    gb = 2 * n * args.vocab * 2 / 1e9  # logits read once, gradient written once
    ref = jax.jit(lambda x, t: lib.row_lse_grad(x, t, g, jnp.bfloat16))
    want = [np.asarray(a, np.float32) for a in ref(x, t)]
    t_ref, c_ref = timed(ref, x, t, iters=args.iters), copies(ref, x, t)
    ch_ref = chained(ref, x, t, args.iters, timed)
    print(f"chunk {n} x {args.vocab}: triton row_lse_grad {t_ref * 1e3:.4f} ms ({gb / t_ref:.0f} GB/s, {c_ref} "
          f"copies of the logits); chained {ch_ref * 1e3:.4f} ms ({gb / ch_ref:.0f} GB/s)", flush=True)
    rows.append({"kernel": "triton", "chunk": n, "ms": t_ref * 1e3, "gb_s": gb / t_ref, "copies": c_ref,
                 "chained_ms": ch_ref * 1e3})
    for b, la, sl, al in itertools.product(*(map(int, a.split(",")) for a in
                                             (args.buffers, args.lookahead, args.slices, args.alias))):
      BUFFERS, LOOKAHEAD, SLICE, ALIAS = b, la, sl, bool(al)
      name = f"buffers {b} lookahead {la} slice {sl} alias {al}"
      try:
        check(n, args.vocab)
        f = jax.jit(lambda x, t: row_lse_grad_smem(x, t, g, jnp.bfloat16))  # fresh: knobs read when traced
        stats = compare(f(x, t), want)
        tk, ck = timed(f, x, t, iters=args.iters), copies(f, x, t)
        ch = chained(f, x, t, args.iters, timed)
      except Exception as e:  # pylint: disable=broad-except  # a knob set that does not compile is reported
        print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
        continue
      print(f"  smem {name}: {tk * 1e3:.4f} ms ({gb / tk:.0f} GB/s, {t_ref / tk:.2f}x triton, {ck} copies); chained "
            f"{ch * 1e3:.4f} ms ({gb / ch:.0f} GB/s); "
            f"lse max |diff| {stats['lse_diff']:.1e}, target equal {stats['target_equal']}, gradient entries differing "
            f"{stats['grad_frac_differ']:.1e} (max rel {stats['grad_max_rel']:.1e})", flush=True)
      rows.append({"kernel": "smem", "chunk": n, "buffers": b, "lookahead": la, "slice": sl, "alias": al,
                   "ms": tk * 1e3, "gb_s": gb / tk, "triton_ms": t_ref * 1e3, "copies": ck, "chained_ms": ch * 1e3,
                   **stats})
  with open(os.path.join(os.environ.get("OUT", "/tmp"), "lse_smem.json"), "w") as fh:
    json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, fh, indent=1)
  return rows


if __name__ == "__main__":
  main()
