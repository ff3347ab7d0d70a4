"""The device mesh and the one table of parameter partition rules.

Mesh axes (GSPMD-style Auto axes, any may be 1):
  data    pure data parallelism: batch split, parameters replicated.
  fsdp    batch split *and* one dimension of every matrix split (ZeRO-3 style; XLA all-gathers per use).
  tensor  Megatron-style tensor parallelism: heads / MLP hidden / vocab split.

Parameter paths are the "/"-joined keys of the nnx.State (e.g. `core/0/attn/q/kernel`). The first rule in
PARTITION_RULES whose regex `re.search`es the path gives the spec; a dimension that its mesh axes do not
divide evenly falls back to replicated on that dimension (tiny models never crash; `describe_sharding`
marks it). Leaves with more dimensions than the spec (stacked layers) get `None` on the leading dims.
"""
import math
import re

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from parcae.paths import path_str  # noqa: F401  (re-exported)

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension of every input is split over both

# Ordered, first match wins. Spec entries: a mesh axis name, or None (replicated on that dimension).
# Embedding [V, d]: tied with the LM head (logits = y @ E^T), so vocab goes on "tensor" (vocab-parallel
#   logits and cross-entropy, as in Megatron) and d on "fsdp".
# Value-embedding tables [V, Hkv*hd]: pure lookups whose output is added to v, and v is head-split over
#   "tensor" by the v kernel; splitting the columns over "tensor" makes the looked-up rows land already
#   head-split (no communication), and the vocab rows go on "fsdp" for memory.
PARTITION_RULES = [
    (r"(^|/)embed/embedding$", ("tensor", "fsdp")),
    (r"(^|/)attn/ve_table/embedding$", ("fsdp", "tensor")),
    (r"(^|/)attn/ve_gate/kernel$", (None, None)),
    (r"(^|/)attn/[qkv]/kernel$", ("fsdp", "tensor")),
    (r"(^|/)attn/o/kernel$", ("tensor", "fsdp")),
    (r"(^|/)mlp/fc/kernel$", ("fsdp", "tensor")),
    (r"(^|/)mlp/proj/kernel$", ("tensor", "fsdp")),
    (r"(^|/)injection/B/kernel$", ("fsdp", None)),
    (r"(^|/)injection/W/kernel$", ("fsdp", None)),
    (r"(^|/)C/kernel$", (None, "fsdp")),
    (r"(^|/)(scale|bias|A_log|dt_bias)$", (None,)),  # norms and injection vectors: replicated
    (r".*", ()),  # anything else: replicated (describe_sharding shows the rule as ".*")
]


def default_mesh_config():
    cfg = ml_collections.ConfigDict()
    cfg.data = -1  # data-parallel size; -1 = all devices left after fsdp and tensor
    cfg.fsdp = 1  # FSDP size: batch split and parameters/optimizer state split on one dim
    cfg.tensor = 1  # tensor-parallel size: heads, MLP hidden and vocab split
    return cfg


def mesh_shape(mesh_cfg, num_devices):
    """Resolves the (data, fsdp, tensor) sizes, filling at most one -1 with the remaining devices."""
    sizes = [int(mesh_cfg[a]) for a in AXES]
    fix = f"set mesh.data/fsdp/tensor so that their product is {num_devices} (one of them may be -1)"
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {dict(zip(AXES, sizes))}: at most one may be -1; {fix}")
    if any(s < 1 and s != -1 for s in sizes):
        raise ValueError(f"mesh sizes {dict(zip(AXES, sizes))} must be >= 1 or -1; {fix}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh sizes {dict(zip(AXES, sizes))}: the fixed sizes (product {known}) do "
                             f"not divide the {num_devices} devices; {fix}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh sizes {dict(zip(AXES, sizes))} (product {math.prod(sizes)}) do not match "
                         f"the {num_devices} devices; {fix}")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None):
    """Builds the ("data", "fsdp", "tensor") mesh with Auto axes over `devices` (default: all)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


class MeshBound:
    """A jitted function traced inside `jax.set_mesh(mesh)` (on call and on `.lower`), so constraints in the
    model (`parcae.model.layers.shard_heads`) see the mesh's axes."""

    def __init__(self, jitted, mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)


def _shape(x):
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _axis_size(mesh, entry):
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names)


def spec_for(path, shape, mesh):
    """Returns (PartitionSpec, matched regex, dims that fell back to replicated) for one leaf."""
    for pattern, rule in PARTITION_RULES:
        if re.search(pattern, path):
            break
    ndim = len(shape)
    if len(rule) > ndim:  # e.g. a scalar matched by a vector rule
        rule = ()
    rule = (None,) * (ndim - len(rule)) + tuple(rule)
    spec, fallback = [], []
    for dim, (size, entry) in enumerate(zip(shape, rule)):
        if entry is not None and size % _axis_size(mesh, entry):
            entry = None
            fallback.append(dim)
        spec.append(entry)
    while spec and spec[-1] is None:  # P("a", None) == P("a") for placement; keep specs short and canonical
        spec.pop()
    return P(*spec), pattern, fallback


def param_specs(params, mesh):
    """Same-structure pytree of PartitionSpec for a params pytree (nnx.State, dict, ...)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: spec_for(path_str(p), _shape(x), mesh)[0], params)


def gathered_spec(spec):
    """A parameter's spec as the train step computes with it: its "fsdp" entries dropped."""
    def drop(entry):
        if isinstance(entry, tuple):
            return tuple(a for a in entry if a != "fsdp") or None
        return None if entry == "fsdp" else entry
    return P(*(drop(e) for e in spec))


def constrain_like_params(tree, gathered: bool):
    """`tree` (the parameters, or their gradients) constrained to the parameters' specs, with "fsdp" dropped if
    `gathered`, when traced under a mesh whose "fsdp" axis is larger than 1; as it is otherwise.

    Under FSDP the train step uses the gathered parameters and constrains each micro-batch's gradients back to
    the sharded specs: XLA all-gathers each weight at its use and reduce-scatters its gradient. Left to
    itself, GSPMD formed weight gradients by all-gathering whole activations over the batch instead
    (parcae-medium on 8 H100s, compiled: -3.5 GiB peak per GPU, -21% bytes moved; bench/RESULTS.md, session 18).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "fsdp" not in mesh.axis_names or mesh.shape["fsdp"] == 1:
        return tree
    specs = param_specs(tree, mesh)
    return jax.tree.map(lambda x, s: jax.lax.with_sharding_constraint(x, gathered_spec(s) if gathered else s),
                        tree, specs)


def param_shardings(params, mesh):
    """Same-structure pytree of NamedSharding."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh))


def batch_sharding(mesh):
    """Sharding of [batch, seq] inputs: batch over ("data", "fsdp"), sequence replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


def describe_sharding(params, mesh):
    """Rows (path, shape, spec string) for every leaf; ' (replicated: dim k not divisible)' marks fallbacks."""
    rows = []
    for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        path, shape = path_str(p), _shape(x)
        spec, _, fallback = spec_for(path, shape, mesh)
        text = str(spec)
        if fallback:
            text += f" (replicated: dim {','.join(map(str, fallback))} not divisible)"
        rows.append((path, shape, text))
    return rows


def opt_state_shardings(opt_state, params, mesh):
    """Shardings for an optimizer-state pytree: a leaf whose path ends with a param's path and whose shape
    equals that param's shape gets the param's spec (Adam mu/nu, momentum); anything else is replicated."""
    by_path = {}
    for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = path_str(p)
        by_path[path] = (_shape(x), spec_for(path, _shape(x), mesh)[0])

    def one(p, x):
        parts, shape = path_str(p).split("/"), _shape(x)
        for i in range(len(parts)):
            hit = by_path.get("/".join(parts[i:]))
            if hit is not None and hit[0] == shape:
                return NamedSharding(mesh, hit[1])
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, opt_state)
