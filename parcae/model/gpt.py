"""GPT baseline: embed -> n_layers pre-norm blocks -> final norm -> tied head (same blocks as Parcae)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from parcae.model import init, layers
from parcae.model.config import ve_layout


class GPT(nnx.Module):
  def __init__(self, cfg, key, quant: str = "bf16"):
    cd = jnp.dtype(cfg.compute_dtype)
    k1, k2 = jax.random.split(key)
    self.cfg, self.cd, self.quant = cfg, cd, quant
    self.embed = layers.Embed(init.embedding(k1, cfg.vocab_size, cfg.d_model))
    self.blocks = layers.make_stage(cfg, k2, ve_layout(cfg)["blocks"], cd, quant)
    self.final_norm = layers.RMSNorm(cfg.d_model, cfg.norm_eps)

  def __call__(self, input_ids, loops=None, key=None):
    """Float32 logits [B, S, V]; `loops` and `key` are accepted for interface parity and ignored."""
    b = input_ids.shape[0]
    zeros = jnp.zeros((b,), jnp.int32)
    return self.logits(self.hidden(input_ids, zeros, zeros)[0])

  def logits(self, y_BxSxD):
    return layers.head_logits(y_BxSxD, self.embed.embedding[...], self.cd)

  def sample_depths(self, key, batch: int):
    zeros = jnp.zeros((batch,), jnp.int32)
    return zeros, zeros

  def hidden(self, ids_BxS, n_B=None, k_B=None, *, key=None, grad_steps=None, quant_key=None):
    """Final-normed hidden states [B, S, D] in the compute dtype (the head GEMM's operand) and no telemetry."""
    cfg = self.cfg
    rope = layers.rope_tables(ids_BxS.shape[1], cfg.d_model // cfg.n_heads, cfg.rope_base)
    x = self.embed(ids_BxS)
    return layers.run_stage(self.blocks, x, rope, [b.attn.lookup_ve(ids_BxS) for b in self.blocks], quant_key,
                            cfg.block_remat, cfg.block_remat_first, norm=self.final_norm, norm_dtype=self.cd), {}

  def hidden_at(self, ids_BxS, loops_K, readout, *, key=None):
    """The looped models' interface: readout(y, {}) once, repeated on a leading K axis (no loop)."""
    out = readout(self.hidden(ids_BxS)[0], {})
    return jax.tree.map(lambda x: jnp.broadcast_to(x, loops_K.shape + jnp.shape(x)), out)
