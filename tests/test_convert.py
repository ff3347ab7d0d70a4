"""parcae.convert: reference state dicts in and out.

The reference's names and [out, in] shapes are written out here from the spec (sections 1.5-1.7, 4), random
values are drawn for them, and the converted model is checked parameter by parameter, against a float64 numpy
forward of the reference's semantics that uses the reference-layout arrays directly, and by exact round trip.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from parcae import convert
from parcae.model import default_model_config

V, D, H, FFN = 64, 64, 2, 2


def tiny_cfg(kind="parcae", **kw):
  c = default_model_config()
  c.kind, c.vocab_size, c.d_model, c.n_heads, c.ffn_mult = kind, V, D, H, FFN
  c.prelude_layers, c.core_layers, c.coda_layers, c.n_layers = 2, 2, 2, 3
  c.mean_recurrence, c.mean_backprop_depth = 3, 2
  c.max_seq_len, c.compute_dtype, c.state_init = 16, "float32", "zero"
  for k, v in kw.items():
    c[k] = v
  return c


def _has_ve(i, n):
  return i % 2 == (n - 1) % 2


def _block_shapes(prefix, d, f, gate, h):
  s = {f"{prefix}.norm_1.weight": (d,), f"{prefix}.norm_2.weight": (d,), f"{prefix}.mlp.fc.weight": (f, d),
       f"{prefix}.mlp.proj.weight": (d, f)}
  s.update({f"{prefix}.attn.{n}.weight": (d, d) for n in ("q", "k", "v", "proj")})
  if gate:
    s[f"{prefix}.attn.ve_gate.weight"] = (h, 32)
  return s


def reference_shapes(c) -> dict[str, tuple]:
  """The reference's state dict (parameters only) for config c, from the spec's description."""
  d, f = c.d_model, c.ffn_mult * c.d_model
  s = {"transformer.wte.weight": (c.vocab_size, d), "lm_head.weight": (c.vocab_size, d),
       "transformer.ln_f.weight": (d,)}
  if c.kind == "gpt":
    for i in range(c.n_layers):
      s.update(_block_shapes(f"transformer.h.{i}", d, f, c.value_embeds and _has_ve(i, c.n_layers), c.n_heads))
      if c.value_embeds and _has_ve(i, c.n_layers):
        s[f"value_embeds.{i}.weight"] = (c.vocab_size, d)
    return s
  p, r, co, mu = c.prelude_layers, c.core_layers, c.coda_layers, c.mean_recurrence
  n_gate = r * c.mean_backprop_depth
  stages = [("prelude", p, 0, 0), ("core_block", r, p, p), ("coda", co, p + r, p + r * mu)]
  for name, n, uid0, lid0 in stages:
    for i in range(n):
      gate = c.value_embeds and _has_ve(lid0 + i, n_gate)
      s.update(_block_shapes(f"transformer.{name}.{i}", d, f, gate, c.n_heads))
      if c.value_embeds and _has_ve(uid0 + i, p + r + co):
        s[f"value_embeds.{uid0 + i}.weight"] = (c.vocab_size, d)
  if c.prelude_norm:
    s["transformer.ln_prelude.weight"] = (d,)
  if c.injection == "diagonal":
    s.update({"transformer.adapter.A_log": (d,), "transformer.adapter.dt_bias": (d,),
              "transformer.adapter.B.weight": (d, d)})
  elif c.injection == "linear":
    s["transformer.adapter.adapter.weight"] = (d, 2 * d)
  s["transformer.C.weight"] = (d, d)
  return s


def random_state_dict(c, seed=0):
  rng = np.random.default_rng(seed)
  sd = {}
  for name, shape in reference_shapes(c).items():
    if name.endswith(("norm_1.weight", "norm_2.weight", "ln_f.weight", "ln_prelude.weight")):
      sd[name] = 1.0 + 0.1 * rng.standard_normal(shape)
    elif name.startswith("value_embeds") or name.endswith(("A_log", "dt_bias", "ve_gate.weight")):
      sd[name] = 0.3 * rng.standard_normal(shape)
    else:
      sd[name] = rng.standard_normal(shape) / np.sqrt(shape[-1])
  sd = {k: v.astype(np.float32) for k, v in sd.items()}
  sd["lm_head.weight"] = sd["transformer.wte.weight"].copy()
  return sd


# ----------------------------------------------------------------------- float64 reference forward (numpy)
def _rms(x, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _rope(x):  # x [S, H, K], adjacent pairs, base from the config
  s, _, k = x.shape
  inv = 50000.0 ** (-np.arange(0, k, 2) / k)
  ang = np.arange(s)[:, None] * inv[None, :]
  c, sn = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
  x0, x1 = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = x0 * c - x1 * sn, x0 * sn + x1 * c
  return out


def _block(sd, pre, x, ids, ve_name, h):
  s, d = x.shape
  w = lambda n: sd[f"{pre}.{n}"].astype(np.float64)  # noqa: E731
  xn = _rms(x, 1e-5) * w("norm_1.weight")
  q, k, v = (xn @ w(f"attn.{n}.weight").T for n in "qkv")
  if ve_name is not None:
    gate = 2.0 / (1.0 + np.exp(-(xn[:, :32] @ w("attn.ve_gate.weight").T)))  # [S, H]
    v = (v.reshape(s, h, -1) + gate[..., None] * sd[ve_name].astype(np.float64)[ids].reshape(s, h, -1))
  q, k, v = (t.reshape(s, h, -1) for t in (q, k, v))
  eps = float(np.finfo(np.float32).eps)
  q, k = _rms(_rope(q), eps), _rms(_rope(k), eps)
  att = np.einsum("shk,thk->hst", q, k) / np.sqrt(q.shape[-1])
  att = np.where(np.tril(np.ones((s, s), bool))[None], att, -np.inf)
  att = np.exp(att - att.max(-1, keepdims=True))
  att /= att.sum(-1, keepdims=True)
  o = np.einsum("hst,thk->shk", att, v).reshape(s, d)
  x = x + o @ w("attn.proj.weight").T
  m = (_rms(x, 1e-5) * w("norm_2.weight")) @ w("mlp.fc.weight").T
  return x + (0.5 * np.maximum(m, 0) ** 2) @ w("mlp.proj.weight").T


def _ve(sd, uid, gate_key):
  return f"value_embeds.{uid}.weight" if f"value_embeds.{uid}.weight" in sd and gate_key in sd else None


def reference_forward(sd, c, ids, loops):
  """Logits [S, V] of one sequence; Parcae with state_init zero."""
  f64 = lambda n: sd[n].astype(np.float64)  # noqa: E731
  x = f64("transformer.wte.weight")[ids]
  h = c.n_heads
  if c.kind == "gpt":
    for i in range(c.n_layers):
      pre = f"transformer.h.{i}"
      x = _block(sd, pre, x, ids, _ve(sd, i, f"{pre}.attn.ve_gate.weight"), h)
    return _rms(x, 1e-5) * f64("transformer.ln_f.weight") @ f64("transformer.wte.weight").T
  p, r = c.prelude_layers, c.core_layers
  run = lambda name, n, uid0, y: [y := _block(sd, f"transformer.{name}.{i}", y, ids,  # noqa: E731
                                               _ve(sd, uid0 + i, f"transformer.{name}.{i}.attn.ve_gate.weight"),
                                               h) for i in range(n)][-1] if n else y
  e = run("prelude", p, 0, x)
  if c.prelude_norm:
    e = _rms(e, 1e-5) * f64("transformer.ln_prelude.weight")
  state = np.zeros_like(e)
  for _ in range(loops):
    if c.injection == "diagonal":
      delta = np.log1p(np.exp(f64("transformer.adapter.dt_bias")))
      decay = np.exp(-delta * np.exp(f64("transformer.adapter.A_log")))
      u = decay * state + delta * (e @ f64("transformer.adapter.B.weight").T)
    elif c.injection == "linear":
      u = np.concatenate([state, e], -1) @ f64("transformer.adapter.adapter.weight").T
    else:
      u = state + e
    state = run("core_block", r, p, u)
  y = run("coda", c.coda_layers, p + r, state @ f64("transformer.C.weight").T)
  return _rms(y, 1e-5) * f64("transformer.ln_f.weight") @ f64("transformer.wte.weight").T


# ----------------------------------------------------------------------- tests
CASES = {
    "parcae-diagonal": dict(),
    "parcae-linear-nonorm": dict(injection="linear", prelude_norm=False),
    "parcae-add-noVE": dict(injection="add", value_embeds=False),
    "gpt": dict(kind="gpt"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_convert_matches_reference_forward_and_round_trips(case):
  c = tiny_cfg(**CASES[case])
  sd = random_state_dict(c)
  model = convert.from_reference(sd, c)
  ids = np.random.default_rng(1).integers(0, V, size=(1, 12))
  want = reference_forward(sd, c, ids[0], loops=2)
  got = np.asarray(model(ids, loops=2))[0]
  # float32 compute vs float64: relative error of the logits well below 1e-4
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
  back = convert.to_reference(model)
  assert sorted(back) == sorted(sd)
  for k in sd:
    assert back[k].dtype == np.float32 and np.array_equal(back[k], sd[k]), k


def test_parameters_land_in_the_right_place():
  c = tiny_cfg()
  sd = random_state_dict(c)
  m = convert.from_reference(sd, c)
  a = lambda x: np.asarray(x[...])  # noqa: E731
  np.testing.assert_array_equal(a(m.embed.embedding), sd["transformer.wte.weight"])
  np.testing.assert_array_equal(a(m.prelude[0].attn.q.kernel), sd["transformer.prelude.0.attn.q.weight"].T)
  np.testing.assert_array_equal(a(m.core[1].attn.o.kernel), sd["transformer.core_block.1.attn.proj.weight"].T)
  np.testing.assert_array_equal(a(m.coda[0].mlp.fc.kernel), sd["transformer.coda.0.mlp.fc.weight"].T)
  np.testing.assert_array_equal(a(m.coda[1].norm2.scale), sd["transformer.coda.1.norm_2.weight"])
  # VE: prelude 1 -> uid 1, core 1 -> uid P+1 = 3, coda 1 -> uid P+R+1 = 5
  for stage, i, uid in (("prelude", 1, 1), ("core", 1, 3), ("coda", 1, 5)):
    blk = getattr(m, stage)[i]
    np.testing.assert_array_equal(a(blk.attn.ve_table.embedding), sd[f"value_embeds.{uid}.weight"])
  gate = sd["transformer.core_block.1.attn.ve_gate.weight"]
  assert gate.shape == (H, 32)
  np.testing.assert_array_equal(a(m.core[1].attn.ve_gate.kernel), gate.T)
  np.testing.assert_array_equal(a(m.injection.B.kernel), sd["transformer.adapter.B.weight"].T)
  np.testing.assert_array_equal(a(m.injection.A_log), sd["transformer.adapter.A_log"])
  np.testing.assert_array_equal(a(m.C.kernel), sd["transformer.C.weight"].T)
  np.testing.assert_array_equal(a(m.prelude_norm.scale), sd["transformer.ln_prelude.weight"])


def test_unused_reference_ve_keys_are_accepted_and_written_as_zeros():
  # P=R=Co=1, mu=3, s=2: tables at uids 0 and 2 (rule over 3 unique layers), gates at odd layer ids over
  # R*s=2: prelude (id 0) table only, core (id 1) gate only, coda (id 4) table only -> no block uses VE
  c = tiny_cfg(prelude_layers=1, core_layers=1, coda_layers=1)
  sd = random_state_dict(c)
  dead = {"value_embeds.0.weight", "value_embeds.2.weight", "transformer.core_block.0.attn.ve_gate.weight"}
  assert dead <= set(sd)
  m = convert.from_reference(sd, c)
  assert all(getattr(m, s)[0].attn.ve_table is None for s in ("prelude", "core", "coda"))
  back = convert.to_reference(m)
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], np.zeros_like(sd[k]) if k in dead else sd[k])


def test_errors_list_missing_unknown_and_misshaped_keys():
  c = tiny_cfg()
  sd = random_state_dict(c)
  del sd["transformer.coda.1.mlp.proj.weight"]
  sd["transformer.coda.7.mlp.fc.weight"] = np.zeros((2, 2), np.float32)
  sd["transformer.C.weight"] = np.zeros((D, D + 1), np.float32)
  with pytest.raises(ValueError) as err:
    convert.from_reference(sd, c)
  msg = str(err.value)
  assert f"transformer.coda.1.mlp.proj.weight ({D}, {FFN * D})" in msg
  assert "unknown" in msg and "transformer.coda.7.mlp.fc.weight" in msg
  assert f"transformer.C.weight: got ({D}, {D + 1}), expected ({D}, {D})" in msg


def test_head_must_be_tied_and_wrappers_and_buffers_are_handled():
  c = tiny_cfg(kind="gpt")
  sd = random_state_dict(c)
  untied = dict(sd, **{"lm_head.weight": sd["lm_head.weight"] + 1.0})
  with pytest.raises(ValueError, match="lm_head.weight differs"):
    convert.from_reference(untied, c)
  wrapped = {f"module.{k.replace('transformer.h.0.', 'transformer.h.0._orig_mod.')}": v for k, v in sd.items()
             if k != "lm_head.weight"}
  wrapped["transformer.freqs_cis"] = np.zeros((1, 16, 1, 16, 2), np.float32)
  back = convert.to_reference(convert.from_reference(wrapped, c))
  assert all(np.array_equal(back[k], sd[k]) for k in sd)


def test_safetensors_reader_writer_and_bf16():
  rng = np.random.default_rng(0)
  arrays = {"a.weight": rng.standard_normal((3, 5)).astype(np.float32), "b": np.arange(4, dtype=np.float32)}
  path = "/tmp/_parcae_test_convert.safetensors"
  convert.write_safetensors(path, arrays)
  back = convert.read_safetensors(path)
  assert all(np.array_equal(back[k], arrays[k]) for k in arrays)
  # a hand-made BF16 tensor: values exactly representable in bf16 widen exactly
  vals = np.array([1.0, -2.5, 0.15625, 3.0e38], np.float32)
  raw = (vals.view(np.uint32) >> 16).astype("<u2").tobytes()
  header = json.dumps({"x": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, len(raw)]}}).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header + raw)
  x = convert.read_safetensors(path)["x"]
  np.testing.assert_array_equal(x, (vals.view(np.uint32) & 0xFFFF0000).view(np.float32).reshape(2, 2))
  os.remove(path)


def test_cli_import_then_export(tmp_path):
  c = tiny_cfg()
  sd = random_state_dict(c)
  cfg_file = tmp_path / "tiny.py"
  fields = {k: c[k] for k in ("vocab_size", "d_model", "n_heads", "ffn_mult", "max_seq_len", "mean_recurrence",
                               "mean_backprop_depth", "compute_dtype", "state_init")}
  cfg_file.write_text(
      "import ml_collections\nfrom parcae.model.config import default_model_config\n"
      "def get_config():\n  m = default_model_config()\n"
      + "".join(f"  m.{k} = {v!r}\n" for k, v in fields.items())
      + "  c = ml_collections.ConfigDict()\n  c.model = m\n  return c\n")
  src = tmp_path / "ref.npz"
  np.savez(src, **sd)
  out = tmp_path / "converted"
  assert convert.convert_main(["--config", str(cfg_file), "--from-reference", str(src), "--out", str(out)]) == 0
  assert (out / "params").is_dir() and (out / "config.json").is_file()
  m = convert.load_params(str(out), c)
  np.testing.assert_array_equal(np.asarray(m.core[0].attn.k.kernel[...]),
                                sd["transformer.core_block.0.attn.k.weight"].T)
  dst = tmp_path / "back.safetensors"
  assert convert.convert_main(["--to-reference", "--workdir", str(out), "--out", str(dst)]) == 0
  back = convert.read_safetensors(str(dst))
  assert sorted(back) == sorted(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
  with pytest.raises(ValueError, match="already exists"):
    convert.convert_main(["--config", str(cfg_file), "--from-reference", str(src), "--out", str(out)])
  with pytest.raises(ValueError, match="torch is not installed|holds more than tensors"):
    pt = tmp_path / "x.pt"
    pt.write_bytes(b"not a torch file")
    convert.load_state_dict(str(pt))
