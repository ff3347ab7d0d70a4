"""The tied-head cross-entropy: values and gradients against float64 and against autodiff of the same formula,
chunk-independence, and what the backward pass keeps."""
import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parcae.model.loss import mean_token_nll, token_nll

B, S, D, V = 2, 16, 32, 96


def inputs(seed=0):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  y = jax.random.normal(k1, (B, S, D), jnp.float32)
  table = 0.3 * jax.random.normal(k2, (V, D), jnp.float32)
  targets = jax.random.randint(k3, (B, S), 0, V)
  weights = jax.random.uniform(k4, (B, S), jnp.float32)  # a cotangent that is not constant per token
  return y, table, targets, weights


def autodiff_nll(y, table, targets, cd):
  """The formula written plainly, differentiated by jax (the loss before the hand-written backward)."""
  logits = jnp.dot(y.astype(cd), table.astype(cd).T).astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  return lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("chunk", [0, 8, 16])
def test_float32_matches_float64(chunk):
  y, table, targets, w = inputs()
  loss = lambda y, t: jnp.sum(w * token_nll(y, t, targets, jnp.float32, chunk))
  val, (gy, gt) = jax.value_and_grad(loss, argnums=(0, 1))(y, table)
  with jax.enable_x64(True):
    y64, t64, w64 = (jnp.asarray(np.asarray(a), jnp.float64) for a in (y, table, w))
    loss64 = lambda y, t: jnp.sum(w64 * autodiff_nll(y, t, targets, jnp.float64))
    val64, (gy64, gt64) = jax.value_and_grad(loss64, argnums=(0, 1))(y64, t64)
    val64, gy64, gt64 = float(val64), np.asarray(gy64), np.asarray(gt64)
  assert abs(float(val) - val64) < 1e-5 * abs(val64)
  np.testing.assert_allclose(np.asarray(gy), gy64, rtol=0, atol=2e-6 * np.abs(gy64).max())
  np.testing.assert_allclose(np.asarray(gt), gt64, rtol=0, atol=2e-6 * np.abs(gt64).max())


def test_bf16_matches_autodiff_of_the_same_formula():
  """The logits rounded to bf16 as the reference's autocast head (exactly the same values as jax's plain
  formula); the gradients agree with autodiff's to the bf16 rounding of its GEMM outputs, which ours keep
  in float32."""
  y, table, targets, w = inputs(1)
  ours = lambda y, t: jnp.sum(w * token_nll(y, t, targets, jnp.bfloat16))
  plain = lambda y, t: jnp.sum(w * autodiff_nll(y, t, targets, jnp.bfloat16))
  np.testing.assert_array_equal(np.asarray(token_nll(y, table, targets, jnp.bfloat16)),
                                np.asarray(autodiff_nll(y, table, targets, jnp.bfloat16)))
  g1 = jax.grad(ours, argnums=(0, 1))(y, table)
  g2 = jax.grad(plain, argnums=(0, 1))(y, table)
  for a, b in zip(g1, g2):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=2 ** -8, atol=2 ** -9 * np.abs(b).max())


def test_chunks_do_not_change_the_values():
  y, table, targets, w = inputs(2)
  vals = [np.asarray(token_nll(y, table, targets, jnp.float32, c)) for c in (0, 1, 4, 32)]
  grads = [jax.grad(lambda y: jnp.sum(w * token_nll(y, table, targets, jnp.float32, c)))(y) for c in (0, 1, 4, 32)]
  for v, g in zip(vals[1:], grads[1:]):
    np.testing.assert_allclose(v, vals[0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g), np.asarray(grads[0]), rtol=1e-5, atol=1e-7)


def test_chunks_take_positions_of_every_row():
  """A chunk of N tokens takes N / B positions of every row where the chunk count divides S (so a batch split
  over devices splits every chunk alike), else positions of a group of rows; `_from_chunks` inverts it."""
  from parcae.model import loss
  ids = jnp.arange(B * S).reshape(B, S)
  for chunk, rows_per_chunk in ((8, B), (16, B), (2, B), (1, 1)):
    layout = loss._layout(B, S, chunk)
    chunks = np.asarray(loss._to_chunks(ids, layout))
    assert chunks.shape == (B * S // chunk, chunk)
    assert all(len(set(c // S)) == rows_per_chunk for c in chunks), (chunk, chunks)
    np.testing.assert_array_equal(np.asarray(loss._from_chunks(jnp.asarray(chunks), layout)), np.asarray(ids))


def test_rows_first_chunks_are_slices_of_the_batch_in_memory():
  """With rows_first (all rows on this device: the training loss on one device or per device) a chunk is a
  contiguous run of the [B, S] tokens (whole rows where the chunk holds several, else a row's consecutive
  positions), so `_to_chunks` is a reshape; `_from_chunks` inverts it."""
  from parcae.model import loss
  ids = jnp.arange(B * S).reshape(B, S)
  for chunk in (B * S, 2 * S, S, S // 2, 1):
    layout = loss._layout(B, S, chunk, rows_first=True)
    chunks = np.asarray(loss._to_chunks(ids, layout))
    np.testing.assert_array_equal(chunks, np.arange(B * S).reshape(-1, chunk))
    np.testing.assert_array_equal(np.asarray(loss._from_chunks(jnp.asarray(chunks), layout)), np.asarray(ids))


def test_backward_keeps_no_logits():
  """The forward pass saves one log-sum-exp per token, never a [tokens, V] array (autodiff keeps one)."""
  from jax.ad_checkpoint import print_saved_residuals
  y, table, targets, w = inputs(3)

  def saved(fn):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      print_saved_residuals(lambda y, t: jnp.sum(w * fn(y, t, targets, jnp.bfloat16)), y, table)
    return [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"^\w+\[([\d,]*)\]", buf.getvalue(), re.M)]
  assert not [s for s in saved(token_nll) if V in s and D not in s], saved(token_nll)
  assert [s for s in saved(autodiff_nll) if V in s and D not in s]  # the check can fail


def test_chunk_must_divide_the_tokens():
  y, table, targets, _ = inputs()
  with pytest.raises(ValueError, match="train.loss_chunk=5 must divide the tokens per micro-batch"):
    token_nll(y, table, targets, jnp.float32, 5)


@pytest.mark.parametrize("cd,chunk,scale", [(jnp.float32, 0, 1.0), (jnp.bfloat16, 8, 0.125), (jnp.bfloat16, 16, 1 / 3)])
def test_mean_loss_with_forward_gradients_equals_differentiating_the_mean(cd, chunk, scale):
  """mean_token_nll (gradients formed in the forward pass, scaled by the cotangent afterwards) against
  autodiff through token_nll(...).mean() * scale, also with the lse kernel (interpreted here; a vocabulary of
  128 for its tiles): differentiated directly (cotangent 1, as the trainer does), the same loss and gradients
  bit for bit. Under an outer factor c the paths round the logit gradient (softmax - onehot) * g to the
  compute dtype at different scales (g vs g * c): each rounds within 2^-8 relative in bf16 (unit roundoff),
  so an entry differs by at most 2^-7 of itself, and a gradient entry by at most 2^-7 times the sum of the
  |terms| it adds up (2^-23 in float32)."""
  y, table, targets, _ = inputs(4)
  for impl in ("xla", "pallas"):
    if impl == "pallas":
      if chunk % 16:
        continue
      table = 0.3 * jax.random.normal(jax.random.key(9), (128, D), jnp.float32)
    for outer in (1.0, 2.5):
      fused = lambda y, t: outer * mean_token_nll(y, t, targets, cd, chunk, impl, scale)
      plain = lambda y, t: outer * (token_nll(y, t, targets, cd, chunk, impl).mean() * scale)
      (v1, g1), (v2, g2) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(y, table) for f in (fused, plain))
      assert float(v1) == float(v2), impl
      if outer == 1.0:
        for a, b in zip(g1, g2):
          np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=impl)
        continue
      yc, tc = (np.asarray(a.astype(cd), np.float64) for a in (y.reshape(-1, D), table))
      logits = np.asarray(jnp.dot(y.astype(cd), table.astype(cd).T).astype(jnp.float32), np.float64).reshape(-1, len(tc))
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      a_dl = np.abs(p - np.eye(len(tc))[np.asarray(targets).reshape(-1)]) * outer * scale / logits.shape[0]
      rel = 2.0 ** -7 if cd == jnp.bfloat16 else 2.0 ** -23
      bounds = (rel * a_dl @ np.abs(tc), rel * a_dl.T @ np.abs(yc))
      for a, b, bound in zip(g1, g2, bounds):
        diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).reshape(bound.shape)
        assert np.all(diff <= 1.01 * bound + 1e-6 * np.abs(np.asarray(b)).max()), (impl, (diff / bound).max())


def test_mean_loss_computes_the_logits_once():
  """Differentiated, token_nll runs the logits GEMM twice per chunk (forward, then recomputed backward);
  mean_token_nll once: counted as [tokens, D] x [D, V] dot_generals in the jaxpr of the gradient."""
  y, table, targets, _ = inputs(5)

  def logit_dots(fn):
    text = str(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(y, table))
    return len(re.findall(rf"bf16\[8,{V}\] = dot_general", text))
  assert logit_dots(lambda y, t: token_nll(y, t, targets, jnp.bfloat16, 8).mean()) == 2
  assert logit_dots(lambda y, t: mean_token_nll(y, t, targets, jnp.bfloat16, 8)) == 1


@pytest.mark.parametrize("shape,chunk", [((2, 2, 2), 32), ((1, 4, 2), 64), ((4, 1, 1), 0)])
def test_mean_loss_per_device_under_a_mesh_equals_the_unsharded_loss(shape, chunk, monkeypatch):
  """Under a mesh whose batch axes split the batch, each device runs the chunk loop on its rows (its local
  loss is called with 1 / shards of the batch and of each chunk) and the value and both gradients equal the
  unsharded loss's up to float32 summation order (per-device partial sums, then a sum over devices)."""
  import parcae.model.loss as loss_lib
  from jax.sharding import NamedSharding, PartitionSpec as P
  b = 8
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  y = jax.random.normal(k1, (b, S, D), jnp.float32)
  table = 0.3 * jax.random.normal(k2, (V, D), jnp.float32)
  targets = jax.random.randint(k3, (b, S), 0, V)
  f = lambda y, t: mean_token_nll(y, t, targets, jnp.float32, chunk, "xla", 0.5)
  want_v, (want_gy, want_gt) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(y, table)
  seen = []
  real = loss_lib._mean_nll
  monkeypatch.setattr(loss_lib, "_mean_nll", lambda y, *a, **k: seen.append((y.shape, a[3])) or real(y, *a, **k))
  mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"), devices=jax.devices()[:8],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    ys = jax.device_put(y, NamedSharding(mesh, P(("data", "fsdp"))))
    ts = jax.device_put(table, NamedSharding(mesh, P("tensor")))
    v, (gy, gt) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(ys, ts)
  shards = shape[0] * shape[1]
  assert seen and all(s == ((b // shards, S, D), (b * S if chunk == 0 else chunk) // shards) for s in seen), seen
  np.testing.assert_allclose(float(v), float(want_v), rtol=1e-6)
  for got, want in ((gy, want_gy), (gt, want_gt)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6 * np.abs(np.asarray(want)).max())
