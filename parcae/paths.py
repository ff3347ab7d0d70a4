"""Parameter paths: the '/'-joined names that the sharding table, the optimizer routing and the counters use."""
from __future__ import annotations

import jax


def path_str(path) -> str:
  """'/'-joined keys of a tree_flatten_with_path path (e.g. "core/0/attn/q/kernel"); drops the trailing
  `.value` attribute of nnx Variables."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and parts[-1] == "value":
    parts.pop()
  return "/".join(parts)
