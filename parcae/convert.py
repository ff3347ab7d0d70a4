"""Interop with the PyTorch reference implementation's state dicts (`parcae convert`).

    model = from_reference(state_dict, model_cfg)   # reference names -> our model (float32 params)
    state_dict = to_reference(model)                # our model -> reference names and layouts (numpy)

Layouts: the reference's Linear weights are [out, in]; our kernels are [in, out], so every matrix is transposed
(q/k/v/proj, mlp fc/proj, VE gate [Hkv, 32] <-> [32, Hkv], injection B [d_r, d] <-> [d, d_r], C [d, d_r] <->
[d_r, d], linear-injection W [d_r, d_r + d] <-> [d_r + d, d_r], rows 0..d_r-1 multiply h). Embeddings [V, d]
and norm weights keep their layout. The reference keeps value-embedding tables in one module-level dict keyed
by a unique layer index (prelude i -> i, core j -> P + j, coda i -> P + R + i; GPT: block index); ours live in
each block's attention (`<stage>/<i>/attn/ve_table/embedding`).

Reference names (for a block prefix such as `transformer.core_block.1.`):
  transformer.wte.weight, lm_head.weight (tied copy), transformer.ln_prelude.weight, transformer.ln_f.weight,
  transformer.{prelude,core_block,coda}.<i>.{norm_1,norm_2}.weight, ...attn.{q,k,v,proj}.weight,
  ...attn.ve_gate.weight, ...mlp.{fc,proj}.weight, value_embeds.<uid>.weight,
  transformer.adapter.{A_log,dt_bias,B.weight} (diagonal), transformer.adapter.adapter.weight (linear),
  transformer.C.weight; GPT blocks: transformer.h.<i>.*
Provenance: verified from the reference's own source: the stage lists `transformer.prelude`,
`transformer.core_block`, `transformer.coda`; the substrings its optimizer routes on (`wte`, `lm_head`, `a_log`,
`dt_bias`, `adapter.b`, `adapter.adapter`, `transformer.c.`). From the spec's description of the reference:
`norm_1`/`norm_2`, `ln_prelude`, `ln_f`, attention `q`/`k`/`v`/`proj`, `mlp.fc`/`mlp.proj`, `ve_gate`,
`value_embeds[str(i)]`, buffer `freqs_cis`. Inferred (not seen in source; one constant each below): the attention
and MLP attribute names `attn`/`mlp`, the GPT block list `transformer.h`, and that `value_embeds` sits at the
top level of the model (not under `transformer.`).

Loading rules: `module.` (DDP) prefixes and `_orig_mod.` (torch.compile) segments are stripped; buffers ending in
`freqs_cis` are ignored; `lm_head.weight` may be absent or must equal the embedding. With odd layer counts the
reference creates VE tables / gates that it never uses (spec 1.7); those keys are shape-checked and dropped on
load, and `to_reference` writes them as zeros so the reference's strict `load_state_dict` still accepts the dict
(missing only the `freqs_cis` buffer, which the reference rebuilds: load with `strict=False`).
"""
from __future__ import annotations

import argparse
import json
import os
import struct

import numpy as np

from parcae.model.config import has_ve, ve_layout
from parcae.model.layers import VE_GATE_WIDTH

STAGES = {"prelude": "transformer.prelude", "core": "transformer.core_block", "coda": "transformer.coda"}
GPT_BLOCKS = "transformer.h"  # inferred
VE_PREFIX = "value_embeds"  # inferred: top-level ModuleDict
IGNORED_SUFFIXES = ("freqs_cis",)
MAX_LISTED = 25  # names listed per category in a mismatch error


# ------------------------------------------------------------------------------------------- name tables
def _block_entries(prefix, blk):
  """(reference name, our Param, transpose?) for one block."""
  a, m = blk.attn, blk.mlp
  out = [(f"{prefix}.norm_1.weight", blk.norm1.scale, False), (f"{prefix}.norm_2.weight", blk.norm2.scale, False),
         (f"{prefix}.attn.q.weight", a.q.kernel, True), (f"{prefix}.attn.k.weight", a.k.kernel, True),
         (f"{prefix}.attn.v.weight", a.v.kernel, True), (f"{prefix}.attn.proj.weight", a.o.kernel, True),
         (f"{prefix}.mlp.fc.weight", m.fc.kernel, True), (f"{prefix}.mlp.proj.weight", m.proj.kernel, True)]
  if a.ve_gate is not None:
    out.append((f"{prefix}.attn.ve_gate.weight", a.ve_gate.kernel, True))
  return out


def _ve_entries(uid, blk):
  t = blk.attn.ve_table
  return [] if t is None else [(f"{VE_PREFIX}.{uid}.weight", t.embedding, False)]


def param_table(model) -> list[tuple[str, object, bool]]:
  """Every parameter of `model` as (reference name, nnx.Param, transpose?)."""
  cfg = model.cfg
  out = [("transformer.wte.weight", model.embed.embedding, False)]
  if cfg.kind == "gpt":
    for i, blk in enumerate(model.blocks):
      out += _block_entries(f"{GPT_BLOCKS}.{i}", blk) + _ve_entries(i, blk)
  else:
    p, r = cfg.prelude_layers, cfg.core_layers
    for stage, offset in (("prelude", 0), ("core", p), ("coda", p + r)):
      for i, blk in enumerate(getattr(model, stage)):
        out += _block_entries(f"{STAGES[stage]}.{i}", blk) + _ve_entries(offset + i, blk)
    if model.prelude_norm is not None:
      out.append(("transformer.ln_prelude.weight", model.prelude_norm.scale, False))
    inj = model.injection
    if cfg.injection == "diagonal":
      out += [("transformer.adapter.A_log", inj.A_log, False), ("transformer.adapter.dt_bias", inj.dt_bias, False),
              ("transformer.adapter.B.weight", inj.B.kernel, True)]
    elif cfg.injection == "linear":
      out.append(("transformer.adapter.adapter.weight", inj.W.kernel, True))
    out.append(("transformer.C.weight", model.C.kernel, True))
  out.append(("transformer.ln_f.weight", model.final_norm.scale, False))
  return out


def dead_reference_keys(cfg) -> dict[str, tuple[int, ...]]:
  """Keys the reference creates but never uses (VE table without gate, or gate without table), with shapes."""
  if cfg.kind == "gpt" or not cfg.value_embeds:
    return {}
  p, r, co = cfg.prelude_layers, cfg.core_layers, cfg.coda_layers
  n_unique, n_gate = p + r + co, r * cfg.mean_backprop_depth
  layout = ve_layout(cfg)
  out = {}
  stages = (("prelude", 0, 0), ("core", p, p), ("coda", p + r, p + r * cfg.mean_recurrence))
  for stage, uid0, lid0 in stages:
    for i in range(cfg[f"{stage}_layers"]):
      if layout[stage][i]:
        continue
      if has_ve(uid0 + i, n_unique):
        out[f"{VE_PREFIX}.{uid0 + i}.weight"] = (cfg.vocab_size, cfg.d_model)
      if has_ve(lid0 + i, n_gate):
        out[f"{STAGES[stage]}.{i}.attn.ve_gate.weight"] = (cfg.n_heads, VE_GATE_WIDTH)
  return out


# ------------------------------------------------------------------------------------------- conversion
def _to_numpy(x):
  if hasattr(x, "detach"):  # a torch tensor (any dtype, any device)
    x = x.detach().cpu().float().numpy()
  return np.asarray(x, dtype=np.float32)


def _clean_name(name: str) -> str:
  name = name[len("module."):] if name.startswith("module.") else name
  return name.replace("_orig_mod.", "")


def _ref_shape(param, transpose):
  shape = tuple(param.shape)
  return shape[::-1] if transpose else shape


def _check_keys(sd, table, dead):
  expected = {name: _ref_shape(p, t) for name, p, t in table}
  expected.update(dead)
  missing = [n for n in expected if n not in sd]
  unknown = sorted(n for n in sd if n not in expected and n != "lm_head.weight")
  bad = [f"{n}: got {tuple(sd[n].shape)}, expected {expected[n]}" for n in expected
         if n in sd and tuple(sd[n].shape) != expected[n]]
  wte = sd.get("transformer.wte.weight")
  if "lm_head.weight" in sd and wte is not None and not np.array_equal(sd["lm_head.weight"], wte):
    bad.append("lm_head.weight differs from transformer.wte.weight, but the model ties its head to the "
               "embedding; convert a tied checkpoint or drop lm_head.weight")
  if not (missing or unknown or bad):
    return
  parts = []
  for title, items in (("missing", [f"{n} {expected[n]}" for n in missing]), ("unknown", unknown),
                       ("mismatched", bad)):
    if items:
      more = f" ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
      parts.append(f"{len(items)} {title} key(s):\n  " + "\n  ".join(items[:MAX_LISTED]) + more)
  raise ValueError("the state dict does not match the reference layout for this model config (check "
                   "model.kind, model.*_layers, d_model, n_heads, vocab_size, value_embeds, injection, "
                   "prelude_norm; shapes are the reference's [out, in]):\n" + "\n".join(parts))


def from_reference(state_dict, model_cfg, quant: str = "bf16"):
  """Our model (parcae.model.build(model_cfg)) filled from the reference's parameter names and arrays."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from parcae.model import build
  sd = {_clean_name(k): v for k, v in state_dict.items() if not k.endswith(IGNORED_SUFFIXES)}
  sd = {k: _to_numpy(v) for k, v in sd.items()}
  model = nnx.eval_shape(lambda: build(model_cfg, quant=quant))  # abstract: no random init to overwrite
  table = param_table(model)
  n_params = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
  if n_params != len(table):
    raise AssertionError(f"convert.param_table covers {len(table)} of the model's {n_params} parameters; "
                         "update it for the new parameter")
  _check_keys(sd, table, dead_reference_keys(model_cfg))
  for name, param, transpose in table:
    value = sd[name].T if transpose else sd[name]
    param.set_value(jnp.asarray(np.ascontiguousarray(value), dtype=jnp.float32))
  return model


def to_reference(model) -> dict[str, np.ndarray]:
  """Reference names -> float32 numpy arrays in the reference's layouts.

  Includes the tied `lm_head.weight` (a copy of the embedding) and zeros for the reference's unused VE keys
  (see the module docstring), so the reference loads the dict with `strict=False` (only `freqs_cis` missing).
  """
  out = {}
  for name, param, transpose in param_table(model):
    value = np.asarray(param[...], dtype=np.float32)
    out[name] = np.ascontiguousarray(value.T if transpose else value)
  out["lm_head.weight"] = out["transformer.wte.weight"].copy()
  for name, shape in dead_reference_keys(model.cfg).items():
    out[name] = np.zeros(shape, np.float32)
  return out


# ------------------------------------------------------------------------------------------- files
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A .safetensors file as float32/int numpy arrays (no safetensors package needed; BF16 widened exactly)."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    start, end = info["data_offsets"]
    raw = data[start:end]
    if info["dtype"] == "BF16":
      arr = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    elif info["dtype"] in _ST_DTYPES:
      arr = np.frombuffer(raw, np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<"))
    else:
      raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which cannot be read; "
                       f"supported: BF16, {', '.join(_ST_DTYPES)}")
    out[name] = arr.reshape(info["shape"])
  return out


def write_safetensors(path: str, arrays: dict[str, np.ndarray]) -> None:
  """float32 arrays -> a .safetensors file (little endian, offsets in name order)."""
  header, blobs, offset = {}, [], 0
  for name in sorted(arrays):
    blob = np.ascontiguousarray(arrays[name], dtype="<f4").tobytes()
    header[name] = {"dtype": "F32", "shape": list(arrays[name].shape), "data_offsets": [offset, offset + len(blob)]}
    blobs.append(blob)
    offset += len(blob)
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    for blob in blobs:
      f.write(blob)


def _import_torch(path):
  try:
    import torch
  except ImportError:
    raise ValueError(f"{path} is a torch file but torch is not installed; `pip install parcae[torch]`, or "
                     "convert the file to .safetensors / .npz first") from None
  return torch


def load_state_dict(path: str) -> dict:
  """Reference state dict from .pt/.pth/.bin (torch), .safetensors or .npz; a {'model': ...} wrapper is opened."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--from-reference {path!r} does not exist")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".safetensors":
    sd = read_safetensors(path)
  elif ext == ".npz":
    with np.load(path) as z:
      sd = {k: z[k] for k in z.files}
  elif ext in (".pt", ".pth", ".bin", ".ckpt"):
    torch = _import_torch(path)
    try:
      sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickled non-tensor objects (e.g. a whole training state)
      raise ValueError(f"{path} holds more than tensors ({type(err).__name__}); re-save only the model's "
                       "state dict: torch.save(model.state_dict(), 'model.pt')") from None
  else:
    raise ValueError(f"--from-reference {path!r}: unknown extension {ext!r}; use .pt, .safetensors or .npz")
  for wrapper in ("model", "state_dict"):
    if isinstance(sd.get(wrapper), dict):
      sd = sd[wrapper]
  return sd


def save_state_dict(path: str, arrays: dict[str, np.ndarray]) -> None:
  ext = os.path.splitext(path)[1].lower()
  if ext == ".npz":
    np.savez(path, **arrays)
  elif ext == ".safetensors":
    write_safetensors(path, arrays)
  elif ext in (".pt", ".pth"):
    torch = _import_torch(path)
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
  else:
    raise ValueError(f"--out {path!r}: unknown extension {ext!r}; use .npz, .safetensors or .pt")


# ------------------------------------------------------------------------------------------- checkpoints
PARAMS_DIR = "params"  # orbax StandardCheckpointer directory of the model's nnx.Param state


def save_params(model, directory: str) -> str:
  """Writes nnx.state(model, nnx.Param) to `directory/params` (orbax StandardCheckpointer); returns the path."""
  import orbax.checkpoint as ocp
  from flax import nnx
  path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  if os.path.exists(path):
    raise ValueError(f"{path} already exists; pick a new --out directory or delete it")
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, nnx.state(model, nnx.Param))
  ckptr.wait_until_finished()
  ckptr.close()
  return path


def load_params(directory: str, model_cfg, quant: str = "bf16"):
  """The model saved by `save_params` (params restored on the first device, float32)."""
  import jax
  import orbax.checkpoint as ocp
  from flax import nnx
  from parcae.model import build
  path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} not found: pass a directory written by `parcae convert --from-reference`")
  abstract = nnx.eval_shape(lambda: build(model_cfg, quant=quant))
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), abstract_params)
  ckptr = ocp.StandardCheckpointer()
  params = ckptr.restore(path, target)
  ckptr.close()
  return nnx.merge(graphdef, params)


# ------------------------------------------------------------------------------------------- CLI
def _model_from_workdir(workdir: str, config_path: str | None, overrides, step):
  """A converted directory (`<dir>/params`) or a `parcae train` run (`<dir>/checkpoints`) -> our model."""
  from flax import nnx
  from parcae.config import load_config
  from parcae.eval.loss import load_params as load_train_params, load_run_config
  cfg = load_config(config_path, overrides) if config_path else load_run_config(workdir)
  if os.path.isdir(os.path.join(workdir, PARAMS_DIR)):
    return load_params(workdir, cfg.model)
  graphdef, params, _, _ = load_train_params(cfg, workdir, step)
  return nnx.merge(graphdef, params)


def convert_main(argv) -> int:
  """`parcae convert`: reference state dict -> params checkpoint, or a run's params -> reference state dict."""
  p = argparse.ArgumentParser(prog="parcae convert", description=(
      "--from-reference IN --out DIR: reference state dict (.pt/.safetensors/.npz) -> DIR/params (orbax) and "
      "DIR/config.json. --to-reference --workdir RUN --out OUT: a run's (or converted dir's) params -> "
      "reference names in OUT (.npz/.safetensors/.pt)."))
  p.add_argument("--config", default=None, help="config file (required with --from-reference)")
  p.add_argument("--from-reference", default=None, help="reference state dict to import")
  p.add_argument("--to-reference", action="store_true", help="export a run's params with reference names")
  p.add_argument("--workdir", default=None, help="with --to-reference: run or converted directory")
  p.add_argument("--step", type=int, default=None, help="with --to-reference: checkpoint step (default latest)")
  p.add_argument("--out", required=True, help="output directory (import) or file (export)")
  rest = [a for a in argv if not a.startswith("--config.")]
  overrides = [a for a in argv if a.startswith("--config.")]
  args = p.parse_args(rest)
  if bool(args.from_reference) == args.to_reference:
    raise ValueError("pass exactly one of --from-reference IN or --to-reference")
  if args.from_reference:
    if not args.config:
      raise ValueError("--from-reference needs --config (the recipe whose model the state dict belongs to)")
    from parcae.config import load_config
    cfg = load_config(args.config, overrides)
    model = from_reference(load_state_dict(args.from_reference), cfg.model)
    path = save_params(model, args.out)
    with open(os.path.join(args.out, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2))
    print(f"wrote {len(param_table(model))} parameters to {path}")
    return 0
  if not args.workdir:
    raise ValueError("--to-reference needs --workdir (a `parcae train` run or a `parcae convert` output)")
  model = _model_from_workdir(args.workdir, args.config, overrides, args.step)
  arrays = to_reference(model)
  save_state_dict(args.out, arrays)
  print(f"wrote {len(arrays)} tensors to {args.out}")
  return 0
