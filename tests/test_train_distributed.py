"""Environment parsing for multi-process start-up, and a real 2-process CPU run on localhost."""
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from parcae.train import distributed as dist

from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_single_process_configs_do_nothing():
    assert dist.distributed_config({}) is None
    assert dist.distributed_config({"JAX_NUM_PROCESSES": "1"}) is None
    assert dist.distributed_config({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert dist.maybe_initialize_distributed({}) is False


def test_jax_env_vars():
    env = {"JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3", "JAX_COORDINATOR_ADDRESS": "10.1.2.3:5000"}
    assert dist.distributed_config(env) == ("10.1.2.3:5000", 4, 3)


def test_jax_env_vars_win_over_slurm():
    env = {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1", "JAX_COORDINATOR_ADDRESS": "h:1",
           "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert dist.distributed_config(env) == ("h:1", 2, 1)


@pytest.mark.parametrize("nodelist,host", [("gpu[003-005,9],cpu1", "gpu003"), ("node7", "node7"),
                                           ("a-b[10,12]", "a-b10"), ("x1,x2", "x1")])
def test_slurm_nodelist_first_host(nodelist, host):
    assert dist.first_host(nodelist) == host


def test_slurm_env_vars():
    env = {"SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_JOB_NODELIST": "gpu[003-004]"}
    assert dist.distributed_config(env) == (f"gpu003:{dist.DEFAULT_PORT}", 16, 9)
    env["SLURM_STEP_NODELIST"] = "gpu[004-005]"
    env["JAX_COORDINATOR_PORT"] = "777"
    assert dist.distributed_config(env) == ("gpu004:777", 16, 9)
    env["JAX_COORDINATOR_ADDRESS"] = "head:1234"
    assert dist.distributed_config(env) == ("head:1234", 16, 9)


@pytest.mark.parametrize("env,words", [
    ({"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1"}, ["JAX_PROCESS_ID is not set"]),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, ["JAX_COORDINATOR_ADDRESS is not set"]),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2", "JAX_COORDINATOR_ADDRESS": "h:1"}, ["outside 0..1"]),
    ({"JAX_NUM_PROCESSES": "two"}, ["JAX_NUM_PROCESSES='two'", "integer"]),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0", "JAX_COORDINATOR_ADDRESS": "hostonly"}, ["host:port"]),
])
def test_bad_env_raises_clear_error(env, words):
    with pytest.raises(ValueError) as err:
        dist.distributed_config(env)
    for w in words:
        assert w in str(err.value)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_coordinator_is_a_clear_error():
    env = {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}", "JAX_DISTRIBUTED_TIMEOUT": "1"}
    with pytest.raises(RuntimeError, match="not reachable within 1s"):
        dist.maybe_initialize_distributed(env)


_WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    import numpy as np
    from parcae.train.distributed import maybe_initialize_distributed
    assert maybe_initialize_distributed()
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from parcae.train.mesh import default_mesh_config, make_mesh
    mesh = make_mesh(default_mesh_config())
    local = np.arange(2, dtype=np.float32) + 10 * jax.process_index()  # 2 local CPU devices, 1 row each
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    print("RESULT", jax.process_index(), jax.process_count(), jax.device_count(), float(total), flush=True)
""")


def test_two_processes_on_localhost_psum(tmp_path):
    port = _free_port()
    procs = []
    for pid in (1, 0):
        env = dict(os.environ, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid), JAX_PLATFORMS="cpu",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_DISTRIBUTED_TIMEOUT="60",
                   XLA_FLAGS=xla_flags(2))
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER.format(repo=REPO)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
        outs.append(out)
        assert p.returncode == 0, out[-3000:]
    results = sorted(line.split()[1:] for out in outs for line in out.splitlines() if line.startswith("RESULT"))
    want = str(float(0 + 1 + 10 + 11))  # both processes' rows, summed across the process boundary
    assert results == [["0", "2", "4", want], ["1", "2", "4", want]]
