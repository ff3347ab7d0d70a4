"""Checkpoints (orbax CheckpointManager) and preemption handling.

One step directory holds four items: `keys` (PRNG impl names), `state` (the train-state pytree: params, optimizer state, step, RNG
keys), `data` (the data iterator's JSON state) and `meta` (a small JSON dict: config, versions, ...).
- Saves are async: `save` returns once the arrays are copied to host; writing goes on in the background.
- Atomic: orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a killed save leaves
  no visible step; leftover tmp dirs are ignored (and cleaned on the next start).
- Retention: the last `keep_last` steps, plus every step divisible by `keep_every` (never deleted).
- Typed PRNG keys are stored as their raw uint32 key data and rebuilt on restore; raw uint32 keys are plain
  arrays already.
- Restore takes an abstract state (jax.ShapeDtypeStruct leaves with `.sharding`), so a checkpoint restores
  onto any mesh or device count.
- Multi-process: every process calls `save`/`restore`; `data` and `meta` are written by process 0, so the
  data state must be the same on every process (true for index-based pipelines sharded per process).
"""
import json
import os
import signal

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P


def _is_key(x):
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(state):
    """Typed PRNG key leaves -> raw uint32 key data (orbax stores plain arrays), plus {path: impl name}."""
    impls = {}

    def one(path, x):
        if not _is_key(x):
            return x
        impls[jax.tree_util.keystr(path)] = str(jax.random.key_impl(x))
        return jax.random.key_data(x)

    return jax.tree_util.tree_map_with_path(one, state), impls


def _abstract_key_data(x):
    """Abstract uint32 key-data leaf for an abstract typed-key leaf (trailing key dims replicated)."""
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (len(data.shape) - len(sharding.spec))
        sharding = NamedSharding(sharding.mesh, P(*spec))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


def _data_to_keys(restored, abstract_state, impls):
    """Rebuilds typed keys where the abstract state has a key dtype, with the impl recorded at save time."""
    def one(path, r, a):
        if not _is_key(a):
            return r
        name = jax.tree_util.keystr(path)
        if name not in impls:
            raise ValueError(f"abstract state leaf {name} is a typed PRNG key but the checkpoint holds no key "
                             "there; pass the abstract state of the same train-state structure that was saved")
        return jax.random.wrap_key_data(r, impl=impls[name])

    return jax.tree_util.tree_map_with_path(one, restored, abstract_state)


def _json_default(x):
    if hasattr(x, "to_dict"):  # ml_collections.ConfigDict
        return x.to_dict()
    if hasattr(x, "item") and getattr(x, "ndim", None) == 0:  # numpy / jax scalars
        return x.item()
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    raise TypeError(f"checkpoint meta/data value {x!r} of type {type(x).__name__} is not JSON-serializable; "
                    "pass plain dicts, lists, strings and numbers (or a ConfigDict)")


def _plain_json(d):
    """A JSON-clean copy of a dict (ConfigDicts and numpy scalars converted)."""
    return json.loads(json.dumps(d.to_dict() if hasattr(d, "to_dict") else dict(d), default=_json_default))


def abstract_like(state, shardings):
    """The abstract state `restore` wants: ShapeDtypeStruct leaves of `state` (arrays or abstract) on
    `shardings` (a same-structure pytree of shardings)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


class Checkpointer:
    """Saves every `every_steps` steps into `directory/<step>/`; see the module docstring."""

    def __init__(self, directory, *, every_steps: int, keep_last: int = 3, keep_every: int | None = None,
                 async_save: bool = True):
        if every_steps < 1:
            raise ValueError(f"checkpoint every_steps={every_steps} must be >= 1 (steps between saves)")
        if keep_last < 1:
            raise ValueError(f"checkpoint keep_last={keep_last} must be >= 1 (how many recent steps to keep)")
        if keep_every is not None and keep_every < 1:
            raise ValueError(f"checkpoint keep_every={keep_every} must be None or >= 1 (steps kept forever)")
        self.every_steps = every_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last,  # LatestN
            keep_period=keep_every,  # steps with step % keep_every == 0 are never deleted
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # remove half-written saves left by a killed run
            create=True,
        )
        self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def should_save(self, step) -> bool:
        return step > 0 and step % self.every_steps == 0

    def save(self, step, state, data_state: dict, meta: dict, *, force: bool = False) -> bool:
        """Starts an (async) save of step `step` if due (or `force`); returns whether one was started."""
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            return False  # e.g. a preemption save right after the regular save of the same step
        state_data, key_impls = _keys_to_data(state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state_data),
            keys=ocp.args.JsonSave(key_impls),
            data=ocp.args.JsonSave(_plain_json(data_state)),
            meta=ocp.args.JsonSave(_plain_json(meta)),
        )
        return bool(self._manager.save(int(step), args=args, force=True))

    def restore(self, step, abstract_state):
        """Returns (state, data_state, meta) of `step` (None = latest), placed on abstract_state's shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no complete checkpoint in {self._manager.directory}; start fresh or point "
                             "the workdir at a directory holding one")
        abstract_data = jax.tree.map(lambda a: _abstract_key_data(a) if _is_key(a) else a, abstract_state)
        out = self._manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_data),
            keys=ocp.args.JsonRestore(),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        ))
        state = _data_to_keys(out["state"], abstract_state, dict(out["keys"]))
        return state, dict(out["data"]), dict(out["meta"])

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


class Preemption:
    """SIGTERM/SIGINT set `requested`; the loop then saves and exits cleanly. A second signal of the same
    kind runs the previous handler (e.g. Ctrl-C twice raises KeyboardInterrupt)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signal = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.requested and signum == self.signal:
            prev = self._previous.get(signum)
            if callable(prev):
                prev(signum, frame)
            elif prev == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)
            return
        self.requested, self.signal = True, signum

    def restore_handlers(self):
        for s, prev in self._previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
