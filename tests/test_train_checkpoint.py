"""Checkpointer: exact round trip, retention, resharding restore, atomicity under kill -9, preemption flag."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from parcae.train import checkpoint as ckpt_lib
from parcae.train import mesh as mesh_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh(data, fsdp, tensor, devices=None):
    cfg = mesh_lib.default_mesh_config()
    cfg.data, cfg.fsdp, cfg.tensor = data, fsdp, tensor
    return mesh_lib.make_mesh(cfg, devices)


def _train_state(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "embed": {"embedding": jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)},
        "core": {"0": {"mlp": {"fc": {"kernel": jnp.asarray(rng.standard_normal((16, 64)), jnp.bfloat16)}}}},
        "final_norm": {"scale": jnp.asarray(rng.standard_normal(16), jnp.float32)},
    }
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-trivial mu/nu/count
    return {"params": params, "opt_state": opt_state, "step": jnp.asarray(7, jnp.int32),
            "key": jax.random.fold_in(jax.random.key(seed), 3), "raw_key": jax.random.PRNGKey(seed + 1)}


def _place(state, mesh):
    shardings = {
        "params": mesh_lib.param_shardings(state["params"], mesh),
        "opt_state": mesh_lib.opt_state_shardings(state["opt_state"], state["params"], mesh),
        "step": NamedSharding(mesh, P()), "key": NamedSharding(mesh, P()), "raw_key": NamedSharding(mesh, P()),
    }
    return jax.device_put(state, shardings), shardings


def _abstract(state, shardings):
    return ckpt_lib.abstract_like(state, shardings)


def _host(x):
    """(kind, dtype or key impl, numpy bytes view) of one leaf; typed keys as their raw data."""
    if ckpt_lib._is_key(x):
        return "key", str(jax.random.key_impl(x)), np.asarray(jax.random.key_data(x))
    return "arr", str(x.dtype), np.asarray(x)


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        (ka, da, xa), (kb, db, xb) = _host(la), _host(lb)
        assert (ka, da, xa.shape) == (kb, db, xb.shape)
        assert xa.tobytes() == xb.tobytes()


def test_round_trip_is_bitwise(tmp_path):
    mesh = _mesh(2, 2, 2)
    state, shardings = _place(_train_state(), mesh)
    ck = ckpt_lib.Checkpointer(tmp_path, every_steps=5)
    data_state = {"next_index": 1234, "epoch": 2, "shard": "a.bin"}
    meta = {"config": {"model": {"d": 16}, "lr": 1e-3}, "git": "abc"}
    assert ck.save(5, state, data_state, meta)
    ck.wait()
    assert ck.latest_step() == 5
    got, got_data, got_meta = ck.restore(5, _abstract(state, shardings))
    _assert_bitwise_equal(got, state)
    assert got_data == data_state and got_meta == meta
    for leaf, sh in zip(jax.tree.leaves(got), jax.tree.leaves(shardings)):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)
    assert jax.random.key_impl(got["key"]) == jax.random.key_impl(state["key"])
    # the restored key generates the same numbers
    np.testing.assert_array_equal(jax.random.normal(got["key"], (4,)), jax.random.normal(state["key"], (4,)))
    ck.close()


def test_configdict_meta_and_numpy_scalars_are_stored_as_json(tmp_path):
    cfg = mesh_lib.default_mesh_config()
    ck = ckpt_lib.Checkpointer(tmp_path, every_steps=1, async_save=False)
    ck.save(1, {"w": jnp.arange(2.0)}, {"next_index": np.int64(3)}, {"mesh": cfg, "lr": np.float32(0.5)})
    abstract = {"w": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=NamedSharding(_mesh(8, 1, 1), P()))}
    _, data, meta = ck.restore(1, abstract)
    assert data == {"next_index": 3}
    assert meta == {"mesh": {"data": -1, "fsdp": 1, "tensor": 1}, "lr": 0.5}
    with pytest.raises(TypeError, match="not JSON-serializable"):
        ck.save(2, {"w": jnp.arange(2.0)}, {}, {"bad": object()})
    ck.close()


def test_should_save_and_force(tmp_path):
    ck = ckpt_lib.Checkpointer(tmp_path, every_steps=3, async_save=False)
    state = {"w": jnp.arange(4.0)}
    assert [s for s in range(10) if ck.should_save(s)] == [3, 6, 9]
    assert not ck.save(4, state, {}, {})
    assert ck.save(4, state, {}, {}, force=True)
    assert not ck.save(4, state, {}, {}, force=True)  # same step twice: no second save
    assert ck.all_steps() == [4]
    ck.close()


def test_retention_keep_last_and_every(tmp_path):
    ck = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep_last=2, keep_every=4)
    for step in range(1, 11):
        ck.save(step, {"w": jnp.full((3,), float(step))}, {"i": step}, {})
    ck.close()
    ck = ckpt_lib.Checkpointer(tmp_path, every_steps=1)
    assert ck.all_steps() == [4, 8, 9, 10]
    on_disk = sorted(int(n) for n in os.listdir(tmp_path) if n.isdigit())
    assert on_disk == [4, 8, 9, 10]
    ck.close()


@pytest.mark.parametrize("src,dst", [("8", "1"), ("1", "8")])
def test_restore_onto_a_different_mesh(tmp_path, src, dst):
    meshes = {"8": _mesh(2, 2, 2), "1": _mesh(1, 1, 1, devices=jax.devices()[:1])}
    state, _ = _place(_train_state(seed=1), meshes[src])
    ck = ckpt_lib.Checkpointer(tmp_path, every_steps=1)
    ck.save(1, state, {"i": 1}, {})
    ck.wait()
    _, dst_shardings = _place(_train_state(seed=1), meshes[dst])
    got, _, _ = ck.restore(None, _abstract(state, dst_shardings))
    _assert_bitwise_equal(got, state)
    n_dev = {leaf.sharding.num_devices for leaf in jax.tree.leaves(got)}
    assert n_dev == {int(dst)}
    ck.close()


@pytest.mark.parametrize("tmp_name", ["3.orbax-checkpoint-tmp", "3.orbax-checkpoint-tmp-1700000000000000"])
def test_half_written_checkpoint_is_ignored(tmp_path, tmp_name):
    ck = ckpt_lib.Checkpointer(tmp_path, every_steps=1)
    for step in (1, 2):
        ck.save(step, {"w": jnp.full((3,), float(step))}, {"i": step}, {})
    ck.close()
    # a save killed mid-write: orbax's tmp name, partially filled
    tmp = tmp_path / tmp_name
    shutil.copytree(tmp_path / "2", tmp)
    shutil.rmtree(tmp / "state")
    ck = ckpt_lib.Checkpointer(tmp_path, every_steps=1)
    assert ck.latest_step() == 2
    got, data, _ = ck.restore(None, {"w": jax.ShapeDtypeStruct((3,), jnp.float32,
                                                               sharding=NamedSharding(_mesh(8, 1, 1), P()))})
    np.testing.assert_array_equal(np.asarray(got["w"]), np.full(3, 2.0))
    assert data == {"i": 2}
    ck.close()


def test_restore_without_checkpoint_raises(tmp_path):
    ck = ckpt_lib.Checkpointer(tmp_path, every_steps=1)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        ck.restore(None, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    ck.close()


_KILL_SCRIPT = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    sys.path.insert(0, {repo!r})
    from parcae.train.checkpoint import Checkpointer
    ck = Checkpointer({dir!r}, every_steps=1, keep_last=3)
    base = jnp.arange(1 << 20, dtype=jnp.float32)  # 4 MB per save so the kill lands mid-write sometimes
    for step in range(1, 100000):
        ck.save(step, {{"w": base + step, "step": jnp.asarray(step)}}, {{"next_index": step}}, {{"s": step}})
        print(step, flush=True)
""")


def test_sigkill_during_training_leaves_restorable_checkpoints(tmp_path):
    ckdir = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT.format(repo=REPO, dir=str(ckdir))],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:  # wait until a few saves have been started
            if int(line) >= 6:  # save 6 was just started: its write is most likely in flight now
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ck = ckpt_lib.Checkpointer(ckdir, every_steps=1)
    steps = ck.all_steps()
    assert steps and steps[-1] >= 4
    abstract = {"w": jax.ShapeDtypeStruct((1 << 20,), jnp.float32, sharding=NamedSharding(_mesh(8, 1, 1), P())),
                "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(_mesh(8, 1, 1), P()))}
    for step in steps[-2:]:  # the latest one (and the one before) are complete and hold that step's values
        got, data, meta = ck.restore(step, abstract)
        np.testing.assert_array_equal(np.asarray(got["w"]), np.arange(1 << 20, dtype=np.float32) + step)
        assert int(got["step"]) == step and data == {"next_index": step} and meta == {"s": step}
    ck.close()


def test_sigterm_sets_the_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    pre = ckpt_lib.Preemption()
    assert not pre.requested
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(100):  # the handler runs between bytecodes of the main thread
        if pre.requested:
            break
        time.sleep(0.01)
    assert pre.requested and pre.signal == signal.SIGTERM
    pre.restore_handlers()
    assert signal.getsignal(signal.SIGTERM) == before


def test_second_sigint_interrupts():
    # pytest-xdist workers ignore SIGINT; install Python's default handler as the one to fall back to.
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    pre = ckpt_lib.Preemption()
    try:
        signal.raise_signal(signal.SIGINT)
        assert pre.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        pre.restore_handlers()
        signal.signal(signal.SIGINT, old)
