"""Mesh construction and the partition table, on 8 fake CPU devices (conftest)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from parcae.train import mesh as mesh_lib


def _cfg(data, fsdp, tensor):
    cfg = mesh_lib.default_mesh_config()
    cfg.data, cfg.fsdp, cfg.tensor = data, fsdp, tensor
    return cfg


# A stand-in with the parameter paths and shapes the Parcae model uses (see mesh.py's docstring).
class _Attn(nnx.Module):
    def __init__(self, d, hd_total, v, rngs):
        self.q = nnx.Linear(d, hd_total, use_bias=False, rngs=rngs)
        self.k = nnx.Linear(d, hd_total, use_bias=False, rngs=rngs)
        self.v = nnx.Linear(d, hd_total, use_bias=False, rngs=rngs)
        self.o = nnx.Linear(hd_total, d, use_bias=False, rngs=rngs)
        self.ve_gate = nnx.Linear(32, 2, use_bias=False, rngs=rngs)
        self.ve_table = nnx.Embed(v, hd_total, rngs=rngs)


class _Mlp(nnx.Module):
    def __init__(self, d, rngs):
        self.fc = nnx.Linear(d, 4 * d, use_bias=False, rngs=rngs)
        self.proj = nnx.Linear(4 * d, d, use_bias=False, rngs=rngs)


class _Block(nnx.Module):
    def __init__(self, d, v, rngs):
        self.norm1 = nnx.RMSNorm(d, rngs=rngs)
        self.attn = _Attn(d, d, v, rngs)
        self.norm2 = nnx.RMSNorm(d, rngs=rngs)
        self.mlp = _Mlp(d, rngs)


class _Injection(nnx.Module):
    def __init__(self, d, rngs):
        self.A_log = nnx.Param(jnp.zeros(d))
        self.dt_bias = nnx.Param(jnp.zeros(d))
        self.B = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.W = nnx.Linear(2 * d, d, use_bias=False, rngs=rngs)


class _Model(nnx.Module):
    def __init__(self, d=16, v=64, rngs=None):
        rngs = rngs or nnx.Rngs(0)
        self.embed = nnx.Embed(v, d, rngs=rngs)
        self.prelude = nnx.List([_Block(d, v, rngs)])
        self.core = nnx.List([_Block(d, v, rngs), _Block(d, v, rngs)])
        self.coda = nnx.List([_Block(d, v, rngs)])
        self.injection = _Injection(d, rngs)
        self.prelude_norm = nnx.RMSNorm(d, rngs=rngs)
        self.final_norm = nnx.RMSNorm(d, rngs=rngs)
        self.C = nnx.Linear(d, d, use_bias=False, rngs=rngs)


EXPECTED = {  # path -> spec on a (2, 2, 2) mesh, written from the rules in the task, not from the code
    "embed/embedding": P("tensor", "fsdp"),
    "core/1/attn/q/kernel": P("fsdp", "tensor"),
    "core/1/attn/k/kernel": P("fsdp", "tensor"),
    "prelude/0/attn/v/kernel": P("fsdp", "tensor"),
    "coda/0/attn/o/kernel": P("tensor", "fsdp"),
    "core/0/attn/ve_gate/kernel": P(),
    "core/0/attn/ve_table/embedding": P("fsdp", "tensor"),
    "core/0/norm1/scale": P(),
    "core/0/norm2/scale": P(),
    "core/0/mlp/fc/kernel": P("fsdp", "tensor"),
    "core/0/mlp/proj/kernel": P("tensor", "fsdp"),
    "injection/A_log": P(),
    "injection/dt_bias": P(),
    "injection/B/kernel": P("fsdp"),
    "injection/W/kernel": P("fsdp"),
    "prelude_norm/scale": P(),
    "final_norm/scale": P(),
    "C/kernel": P(None, "fsdp"),
}


def _flat(tree):
    return {mesh_lib.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_default_config_fills_all_devices():
    mesh = mesh_lib.make_mesh(mesh_lib.default_mesh_config())
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert tuple(mesh.axis_types) == (AxisType.Auto,) * 3


@pytest.mark.parametrize("sizes,want", [((2, 2, 2), (2, 2, 2)), ((-1, 4, 1), (2, 4, 1)), ((1, 1, -1), (1, 1, 8))])
def test_mesh_shapes(sizes, want):
    mesh = mesh_lib.make_mesh(_cfg(*sizes))
    assert tuple(mesh.shape[a] for a in mesh_lib.AXES) == want


def test_mesh_on_subset_of_devices():
    mesh = mesh_lib.make_mesh(_cfg(-1, 1, 1), devices=jax.devices()[:1])
    assert mesh.devices.size == 1


@pytest.mark.parametrize("sizes,words", [
    ((2, 2, 1), ["product 4", "8 devices", "mesh.data/fsdp/tensor"]),
    ((-1, -1, 2), ["at most one may be -1"]),
    ((0, 8, 1), [">= 1 or -1"]),
    ((-1, 3, 1), ["do not divide the 8 devices"]),
])
def test_bad_mesh_raises_clear_error(sizes, words):
    with pytest.raises(ValueError) as err:
        mesh_lib.make_mesh(_cfg(*sizes))
    for w in words:
        assert w in str(err.value)


def test_params_are_sharded_as_the_table_says():
    mesh = mesh_lib.make_mesh(_cfg(2, 2, 2))
    params = nnx.state(_Model(), nnx.Param)
    placed = jax.device_put(params, mesh_lib.param_shardings(params, mesh))
    flat = _flat(placed)
    for path, want in EXPECTED.items():
        arr = flat[path]
        assert arr.sharding.spec == want, path
        # the shard a device holds really is the slice the spec says
        n_shards = [1 if e is None else mesh.shape[e] for e in tuple(want) + (None,) * (arr.ndim - len(want))]
        want_shape = tuple(s // n for s, n in zip(arr.shape, n_shards))
        assert arr.addressable_shards[0].data.shape == want_shape, path
    assert len(flat) == 4 * 10 + 1 + 4 + 2 + 1  # 4 blocks x 10 leaves, embed, injection, 2 norms, C


def test_every_model_param_matches_a_specific_rule():
    mesh = mesh_lib.make_mesh(_cfg(2, 2, 2))
    for p, x in jax.tree_util.tree_flatten_with_path(nnx.state(_Model(), nnx.Param))[0]:
        _, pattern, _ = mesh_lib.spec_for(mesh_lib.path_str(p), x.shape, mesh)
        assert pattern != ".*", mesh_lib.path_str(p)


def test_indivisible_dims_fall_back_to_replicated():
    mesh = mesh_lib.make_mesh(_cfg(1, 4, 2))
    params = nnx.state(_Model(d=6, v=10), nnx.Param)  # 6 % 4 != 0, 10 % 2 == 0, 24 % 2 == 0
    placed = jax.device_put(params, mesh_lib.param_shardings(params, mesh))
    flat = _flat(placed)
    assert flat["embed/embedding"].sharding.spec == P("tensor")  # d=6 on fsdp=4 fell back
    assert flat["core/0/mlp/fc/kernel"].sharding.spec == P(None, "tensor")
    rows = {path: spec for path, _, spec in mesh_lib.describe_sharding(params, mesh)}
    assert "not divisible" in rows["embed/embedding"]
    assert "not divisible" not in rows["core/0/norm1/scale"]


def test_describe_sharding_rows():
    mesh = mesh_lib.make_mesh(_cfg(2, 2, 2))
    rows = mesh_lib.describe_sharding(nnx.state(_Model(), nnx.Param), mesh)
    by_path = {r[0]: r for r in rows}
    assert by_path["embed/embedding"][1] == (64, 16)
    assert "tensor" in by_path["embed/embedding"][2]


def test_stacked_leading_dim_and_plain_dicts():
    mesh = mesh_lib.make_mesh(_cfg(2, 2, 2))
    tree = {"core": {"attn": {"q": {"kernel": np.zeros((3, 16, 16))}}}, "step": np.zeros(())}
    specs = mesh_lib.param_specs(tree, mesh)
    assert specs["core"]["attn"]["q"]["kernel"] == P(None, "fsdp", "tensor")
    assert specs["step"] == P()


def test_abstract_leaves_are_accepted():
    mesh = mesh_lib.make_mesh(_cfg(2, 2, 2))
    abstract = jax.eval_shape(lambda: nnx.state(_Model(), nnx.Param))
    specs = _flat(mesh_lib.param_specs(abstract, mesh))
    assert specs["core/0/attn/o/kernel"] == P("tensor", "fsdp")


def test_batch_sharding():
    mesh = mesh_lib.make_mesh(_cfg(2, 2, 2))
    x = jax.device_put(np.zeros((8, 5), np.int32), mesh_lib.batch_sharding(mesh))
    assert x.addressable_shards[0].data.shape == (2, 5)
    assert x.sharding.spec == P(("data", "fsdp"), None)


def test_opt_state_follows_params():
    mesh = mesh_lib.make_mesh(_cfg(2, 2, 2))
    model = _Model()
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    params, opt_state = nnx.state(model, nnx.Param), nnx.state(opt)["opt_state"]
    placed = jax.device_put(opt_state, mesh_lib.opt_state_shardings(opt_state, params, mesh))
    flat = _flat(placed)
    assert flat["0/mu/core/0/attn/q/kernel"].sharding.spec == P("fsdp", "tensor")
    assert flat["0/nu/embed/embedding"].sharding.spec == P("tensor", "fsdp")
    assert flat["0/count"].sharding.spec == P()
    assert flat["0/nu/C/kernel"].sharding.spec == P(None, "fsdp")


def test_sharded_matmul_matches_unsharded():
    mesh = mesh_lib.make_mesh(_cfg(2, 2, 2))
    params = nnx.state(_Model(), nnx.Param)
    placed = jax.device_put(params, mesh_lib.param_shardings(params, mesh))
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    xs = jax.device_put(x, mesh_lib.batch_sharding(mesh))
    w_fc, w_proj = _flat(placed)["core/0/mlp/fc/kernel"], _flat(placed)["core/0/mlp/proj/kernel"]
    got = jax.jit(lambda a, b, c: jnp.maximum(a @ b, 0) @ c)(xs, w_fc, w_proj)
    w1, w2 = np.asarray(w_fc, np.float64), np.asarray(w_proj, np.float64)
    want = np.maximum(x.astype(np.float64) @ w1, 0) @ w2
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_attention_inputs_get_one_sharding_under_the_mesh():
    """q, k, v are constrained to HEADS_SPEC when traced under the trainer's mesh (cuDNN attention's
    partitioner rejects q/k/v with different shardings, which FSDP kernels otherwise produce); outside a
    mesh the constraint is a no-op."""
    from parcae.model import layers
    mesh = mesh_lib.make_mesh(_cfg(2, 2, 2), jax.devices()[:8])
    x = jnp.ones((4, 8, 4, 16))
    f = mesh_lib.MeshBound(jax.jit(layers.shard_heads), mesh)
    want = jax.sharding.NamedSharding(mesh, layers.HEADS_SPEC)
    assert f(x).sharding.is_equivalent_to(want, x.ndim)
    assert f.lower(x).compile().output_shardings.is_equivalent_to(want, x.ndim)
    np.testing.assert_array_equal(np.asarray(jax.jit(layers.shard_heads)(x)), np.asarray(x))
    assert jax.jit(layers.shard_heads)(x).sharding.is_fully_replicated


def test_fused_qkv_gemm_needs_no_resharding_under_tensor_parallelism(monkeypatch):
    """Attention.qkv orders the fused kernel's columns [q | k | v] per "tensor" shard: under a data x tensor
    mesh the fused GEMM runs on each device's own heads with no collective, and gives the unsharded values.
    With the plain [Wq | Wk | Wv] order (forced below) XLA has to gather, so the check can fail."""
    from parcae.model import default_model_config, layers

    class Holder(nnx.Module):
        def __init__(self):
            cfg = default_model_config()
            cfg.d_model, cfg.n_heads = 64, 4
            self.attn = layers.Attention(cfg, jax.random.key(0), with_ve=False, cd=jnp.float32, quant="bf16")

    gd, params = nnx.split(Holder())
    mesh = mesh_lib.make_mesh(_cfg(2, 1, 4), jax.devices()[:8])
    placed = jax.device_put(params, mesh_lib.param_shardings(params, mesh))
    x = jax.random.normal(jax.random.key(1), (4, 8, 64))
    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, None)))
    want = jax.jit(lambda p, x: nnx.merge(gd, p).attn.qkv(x))(params, x)

    def collectives():
        f = mesh_lib.MeshBound(jax.jit(lambda p, x: nnx.merge(gd, p).attn.qkv(x)), mesh)  # a fresh trace
        for a, b in zip(f(placed, xs), want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        hlo = f.lower(placed, xs).compile().as_text()
        return [op for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce") if op + "(" in hlo]
    assert collectives() == []
    monkeypatch.setattr(layers, "tensor_shards", lambda n_heads: 1)
    assert collectives() != []


def test_gathered_spec_drops_only_fsdp():
    assert mesh_lib.gathered_spec(P("fsdp", "tensor")) == P(None, "tensor")
    assert mesh_lib.gathered_spec(P("tensor", "fsdp")) == P("tensor", None)
    assert mesh_lib.gathered_spec(P(("data", "fsdp"), None)) == P(("data",), None)
    assert mesh_lib.gathered_spec(P(("fsdp",), "tensor")) == P(None, "tensor")
    assert mesh_lib.gathered_spec(P()) == P()


def _all_gather_shapes(fsdp: int):
    """The shapes of every all-gather result in the compiled train step of the trainer tests' tiny Parcae model
    on a (data 8/fsdp, fsdp) mesh of the CPU devices, and the shapes a parameter gather may have: a parameter's,
    or some of a group of same-shape Muon kernels stacked (the optimizer orthogonalizes each group as one batch)."""
    import re
    from parcae.model import build
    from parcae.train import optim
    from parcae.train.loop import compile_train_step
    from train_helpers import tiny_config
    cfg = tiny_config("unused", micro_batch_size=16, seq_len=32, grad_accum=2, loss_chunk=128)  # no data read
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 8 // fsdp, fsdp, 1
    compiled, _, _ = compile_train_step(cfg, jax.devices()[:8])
    gathered = {tuple(int(d) for d in dims.split(",") if d)
                for dims in re.findall(r"= \w+\[([\d,]*)\][^=]*? all-gather(?:-start)?\(", compiled.as_text())}
    params = nnx.state(nnx.eval_shape(lambda: build(cfg.model, jax.random.key(0))), nnx.Param)
    leaves = jax.tree.leaves(params)
    routes = [r for _, r in optim.param_routes(params, cfg.optim.name)]
    # a stacked group may also be gathered in parts (GSPMD can split it over the devices by matrix)
    allowed = {x.shape for x in leaves} | {(m,) + leaves[g[0]].shape for g in optim._same_shape_groups(leaves, routes)
                                           for m in range(1, len(g) + 1)}
    return gathered, allowed


def test_fsdp_gathers_weights_not_activations(monkeypatch):
    """Under FSDP the train step all-gathers parameters (a kernel, or a same-shape group of Muon kernels
    stacked), never an activation over the batch. Without `constrain_like_params` (patched out below) GSPMD
    gathered activations ([8, 32, 192] among them) to form weight gradients, so the check can fail."""
    gathered, allowed = _all_gather_shapes(fsdp=4)
    assert gathered, "expected FSDP to gather parameters"
    assert gathered <= allowed, sorted(gathered - allowed)
    monkeypatch.setattr(mesh_lib, "constrain_like_params", lambda tree, gathered: tree)
    gathered, allowed = _all_gather_shapes(fsdp=4)
    assert not gathered <= allowed


def _head_loop_collectives():
  """Collectives inside the loss head's chunk loop (the while body that runs the [tokens, vocabulary] logits
  GEMM) of the trainer tests' tiny Parcae step on a (data 2, fsdp 4) mesh of the CPU devices."""
  import re
  from parcae.train.loop import compile_train_step
  from train_helpers import VOCAB, tiny_config
  cfg = tiny_config("unused", micro_batch_size=16, seq_len=32, grad_accum=2, loss_chunk=128)  # 4 chunks
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 4, 1
  hlo = compile_train_step(cfg, jax.devices()[:8])[0].as_text()
  comps = {m.group(1): m.group(0) for m in re.finditer(r"^(?:ENTRY )?%(\S+) .*?^\}", hlo, re.M | re.S)}

  def runs_head_gemm(name, seen=()):
    text = comps.get(name, "")
    return bool(re.search(rf"= \w+\[\d+,{VOCAB}\]\S* dot\(", text)) or any(
        runs_head_gemm(k, seen + (name,)) for k in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", text) if k not in seen)
  bodies = [b for b in set(re.findall(r"body=%([\w.\-]+)", hlo)) if runs_head_gemm(b)]
  assert bodies, "no chunk loop found"
  return [op for b in bodies for op in re.findall(r" (all-reduce|reduce-scatter|all-gather)(?:-start)?\(", comps[b])]


def test_loss_head_sums_the_table_gradient_once_per_micro_batch_under_fsdp(monkeypatch):
  """Under FSDP each device runs the loss head's chunk loop on its rows and the table gradient is summed over
  the devices once per call, not inside the loop (where GSPMD, with the loop's carried table gradient
  sharded like the table, reduced it after every chunk: patched back below)."""
  from parcae.model import loss
  assert _head_loop_collectives() == []
  monkeypatch.setattr(loss, "kernel_batch_axes", lambda mesh: ())
  assert _head_loop_collectives() != []
