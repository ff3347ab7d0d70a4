"""Model configuration: defaults with one comment per field, validation with field-named errors.

`config.model` of every recipe in configs/ is built from `default_model_config()` and then edited. The shipped
sizes follow the reference tables (spec section 4); `SIZES` holds their widths and depths.
"""
from __future__ import annotations

import ml_collections

KINDS = ("parcae", "gpt")
INJECTIONS = ("diagonal", "linear", "add")
STATE_INITS = ("like-init", "zero", "normal", "embed", "unit")
SAMPLING_SCHEMES = ("poisson-truncated-full", "poisson-full", "fixed")
SAMPLING_GRANULARITIES = ("per-sequence", "per-batch")
REMAT_POLICIES = ("full", "dots", "none")
BLOCK_REMAT_POLICIES = REMAT_POLICIES + ("mlp_act",)  # mlp_act: recompute only the MLP activation
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
KERNEL_IMPLS = ("auto", "xla", "pallas")  # rope_impl, lse_impl, norm_impl
MLP_IMPLS = ("auto", "xla", "mosaic", "jnp")  # mlp_impl, qkv_impl ("jnp": the fused path's VJP with jnp kernels, tests)
COMPUTE_DTYPES = ("bfloat16", "float32")

# name: (d_model, n_heads, prelude, core, coda); GPT uses n_layers = prelude + core + coda.
SIZES = {
    "small": (768, 6, 2, 2, 2),
    "medium": (1024, 8, 4, 4, 4),
    "large": (1280, 10, 6, 6, 6),
    "xlarge": (1536, 12, 8, 8, 8),
}


def default_model_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.kind = "parcae"  # "parcae" (looped) or "gpt" (plain decoder baseline)
  c.vocab_size = 32768  # padded vocabulary size (embedding rows, tied head columns)
  c.d_model = 768  # residual width d; the loop state has the same width
  c.n_heads = 6  # attention heads; head_dim = d_model / n_heads (128 in every shipped size)
  c.n_layers = 6  # GPT only: number of blocks
  c.prelude_layers = 2  # Parcae: blocks before the loop
  c.core_layers = 2  # Parcae: blocks in the shared, looped core
  c.coda_layers = 2  # Parcae: blocks after the loop
  c.ffn_mult = 4  # MLP hidden width = ffn_mult * d_model
  c.max_seq_len = 2048  # longest sequence (RoPE positions)
  c.rope_base = 50000.0  # RoPE base; pairs (2i, 2i+1) of the parameters (computed as split halves: layers.split_pairs)
  c.norm_eps = 1e-5  # RMSNorm epsilon (computed in float32)
  c.qk_norm = True  # parameter-free RMS norm of q and k after RoPE (eps = dtype epsilon)
  c.value_embeds = True  # value embeddings with 2*sigmoid gates on alternate layers
  c.injection = "diagonal"  # "diagonal" (Parcae), "linear" (concat + linear), "add"
  c.prelude_norm = True  # RMSNorm on the prelude output before injection
  c.state_init = "like-init"  # loop-state init: like-init | zero | normal | embed | unit
  c.mean_recurrence = 8  # mu: mean loop count in training, default loop count at test time
  c.mean_backprop_depth = 4  # s: iterations with gradient (truncated backprop), s >= 1
  c.sampling_scheme = "poisson-truncated-full"  # depth sampler (see model/sampler.py)
  c.sampling_granularity = "per-sequence"  # one depth per sequence, or one per batch
  c.max_backprop_depth = 0  # poisson-full only: static cap on k (0 = 3 * mean_recurrence)
  c.compute_dtype = "bfloat16"  # matmul dtype; "float32" for exact checks (params stay float32)
  c.remat = "full"  # recompute policy per grad loop iteration: full | dots | none (layers.REMAT)
  c.grad_unroll = False  # unroll the grad phase: grad_depth copies of the core (no stacked residuals; compile grows)
  # no-grad loop: 1 = the whole batch to max(n_B); 2 = each batch shard's deeper half alone for the last iterations;
  # 4 = that half's deeper half alone again for the very last
  c.no_grad_split = 1
  # recompute policy per block of GPT and of Parcae's prelude / coda: none | full | dots | mlp_act (ReLU^2's
  # output only: one MLP-sized array less per block for one elementwise pass)
  c.block_remat = "none"
  c.block_remat_first = 0  # block_remat only for the first N blocks of each of those stages (0 = every block)
  c.attention_impl = "auto"  # "auto" = cuDNN fused attention on a GPU with bf16 compute, else "xla"
  # RoPE + QK-norm and the value embeddings' mix: "auto" = one Pallas kernel each way on a GPU where the shape
  # allows (else the jnp path, "xla"); "pallas" forces the kernels (interpreted on a CPU; an error where they
  # cannot run, e.g. decode steps)
  c.rope_impl = "auto"
  # Loss head's log-sum-exp: "auto" = one Pallas pass over the logits on a GPU where chunk and vocabulary allow (else
  # the two-pass jnp formula, "xla"); "pallas" forces the kernel (interpreted on a CPU; an error where it cannot run)
  c.lse_impl = "auto"
  # ReLU^2 MLP (bf16 recipe): "auto" = Mosaic GPU GEMMs with ReLU^2 / its backward product fused (model/mlp_kernels.py)
  # on a Hopper GPU where the shapes allow, else XLA's GEMMs and separate elementwise passes ("xla");
  # "mosaic" forces the kernels (an error where they cannot run)
  c.mlp_impl = "auto"
  # The residual adds that a block's RMSNorms read (norm2; norm1 but in a stage's first block): "auto" = add + norm
  # as one Pallas kernel each way (model/add_norm.py) on a GPU where the shapes allow, else XLA's fusions ("xla");
  # "pallas" forces the kernels (interpreted on a CPU; an error where they cannot run). H100 training: +1.0% /
  # +1.3% / +1.2% for parcae-small / gpt-small / parcae-medium (bench/RESULTS.md, session 23). With a diagonal
  # injection the loop's boundary (state update, injection, next pass's norm1) then runs as one kernel each way
  # too (model/loop_boundary.py; session 24: training +0.3%, evaluation +1.7% on parcae-small)
  c.norm_impl = "auto"
  # The q/k/v GEMM of blocks without value embeddings (bf16 recipe, QK-norm on): "auto" = one Mosaic GPU GEMM with
  # RoPE + QK-norm in its epilogue (model/qkv_rope.py) on a Hopper GPU where the shapes allow (head_dim 128, no
  # "tensor" axis), else XLA's GEMM and the RoPE path of rope_impl ("xla"); "mosaic" forces the kernel, "jnp" its
  # custom VJP with a jnp stand-in (tests). H100, parcae-small: training +1.0% / +1.1% in two A/B pairs, evaluation
  # +1.1% / +1.4%, same peak memory; the step compiles ~90 s longer (194 vs 103 s; bench/RESULTS.md, session 39)
  c.qkv_impl = "auto"
  return c


def size_config(kind: str, size: str) -> ml_collections.ConfigDict:
  """The reference's model `kind`-`size` (e.g. parcae small = parcae-small-140m)."""
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
  d, h, p, r, co = SIZES[size]
  c = default_model_config()
  c.kind, c.d_model, c.n_heads = kind, d, h
  c.prelude_layers, c.core_layers, c.coda_layers, c.n_layers = p, r, co, p + r + co
  return c


def _choice(cfg, field, allowed):
  value = cfg[field]
  if value not in allowed:
    raise ValueError(f"model.{field}={value!r} is not supported; choose one of {list(allowed)}")


def validate_model_config(cfg) -> None:
  """Raise ValueError naming the offending `model.<field>` and the fix."""
  _choice(cfg, "kind", KINDS)
  _choice(cfg, "injection", INJECTIONS)
  _choice(cfg, "state_init", STATE_INITS)
  _choice(cfg, "sampling_scheme", SAMPLING_SCHEMES)
  _choice(cfg, "sampling_granularity", SAMPLING_GRANULARITIES)
  _choice(cfg, "remat", REMAT_POLICIES)
  _choice(cfg, "block_remat", BLOCK_REMAT_POLICIES)
  _choice(cfg, "attention_impl", ATTENTION_IMPLS)
  _choice(cfg, "rope_impl", KERNEL_IMPLS)
  _choice(cfg, "lse_impl", KERNEL_IMPLS)
  _choice(cfg, "mlp_impl", MLP_IMPLS)
  _choice(cfg, "norm_impl", KERNEL_IMPLS)
  _choice(cfg, "qkv_impl", MLP_IMPLS)
  _choice(cfg, "no_grad_split", (1, 2, 4))
  _choice(cfg, "compute_dtype", COMPUTE_DTYPES)
  positive = ["vocab_size", "d_model", "n_heads", "ffn_mult", "max_seq_len"]
  positive += ["n_layers"] if cfg.kind == "gpt" else ["core_layers", "mean_recurrence"]
  for f in positive:
    if cfg[f] < 1:
      raise ValueError(f"model.{f}={cfg[f]} must be >= 1")
  for f in ("prelude_layers", "coda_layers", "max_backprop_depth", "block_remat_first"):
    if cfg[f] < 0:
      raise ValueError(f"model.{f}={cfg[f]} must be >= 0")
  if cfg.d_model % cfg.n_heads:
    raise ValueError(f"model.n_heads={cfg.n_heads} does not divide model.d_model={cfg.d_model}; pick heads so "
                     f"that d_model / n_heads is an even integer (e.g. n_heads={max(1, cfg.d_model // 128)})")
  if (cfg.d_model // cfg.n_heads) % 2:
    raise ValueError(f"head_dim = model.d_model / model.n_heads = {cfg.d_model // cfg.n_heads} must be even "
                     "(RoPE rotates channel pairs)")
  if cfg.value_embeds and cfg.d_model < 32:
    raise ValueError(f"model.value_embeds gates read 32 channels but model.d_model={cfg.d_model}; "
                     "set model.value_embeds=False or d_model >= 32")
  if cfg.kind == "parcae" and cfg.mean_backprop_depth < 1:
    raise ValueError(f"model.mean_backprop_depth={cfg.mean_backprop_depth} must be >= 1 (s >= 1 iterations "
                     "with gradient)")
  if cfg.rope_base <= 0 or cfg.norm_eps <= 0:
    raise ValueError("model.rope_base and model.norm_eps must be > 0")


def grad_depth(cfg) -> int:
  """Static length of the gradient phase of the loop (k <= this for every sampled depth)."""
  if cfg.sampling_scheme == "poisson-full":
    return cfg.max_backprop_depth or 3 * cfg.mean_recurrence
  return cfg.mean_backprop_depth


def has_ve(layer: int, n_layers: int) -> bool:
  """The reference's alternate-layer rule: the last layer always has value embeddings."""
  return layer % 2 == (n_layers - 1) % 2


def ve_layout(cfg) -> dict[str, list[bool]]:
  """Which blocks of each stage use value embeddings.

  The reference creates a VE *table* for unique layer i when has_ve(i, P+R+Co) and a *gate* for block
  layer_id when has_ve(layer_id, R*s); VE is applied only when both exist. We create a table and gate only
  where both rules agree, so no parameter is ever dead. For every shipped size the two rules coincide
  (odd-indexed blocks of each stage) and the parameter counts equal the reference's exactly.
  """
  if not cfg.value_embeds:
    if cfg.kind == "gpt":
      return {"blocks": [False] * cfg.n_layers}
    return {s: [False] * cfg[f"{s}_layers"] for s in ("prelude", "core", "coda")}
  if cfg.kind == "gpt":
    return {"blocks": [has_ve(i, cfg.n_layers) for i in range(cfg.n_layers)]}
  p, r, co, mu = cfg.prelude_layers, cfg.core_layers, cfg.coda_layers, cfg.mean_recurrence
  n_unique, n_gate = p + r + co, r * cfg.mean_backprop_depth
  return {
      "prelude": [has_ve(i, n_unique) and has_ve(i, n_gate) for i in range(p)],
      "core": [has_ve(p + j, n_unique) and has_ve(p + j, n_gate) for j in range(r)],
      "coda": [has_ve(p + r + i, n_unique) and has_ve(p + r * mu + i, n_gate) for i in range(co)],
  }
