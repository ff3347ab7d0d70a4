"""Multi-process start-up: `jax.distributed.initialize` from environment variables, only when needed.

Read, first match wins:
  JAX_NUM_PROCESSES, JAX_PROCESS_ID, JAX_COORDINATOR_ADDRESS (host:port)   set by launch/local_multiprocess.sh
  SLURM_NTASKS, SLURM_PROCID, SLURM_JOB_NODELIST (+ JAX_COORDINATOR_ADDRESS or JAX_COORDINATOR_PORT)
                                                                            set by srun (launch/slurm.sbatch)
JAX_DISTRIBUTED_TIMEOUT (seconds, default 300) bounds the wait for the coordinator. One process: nothing is
called. JAX_LOCAL_DEVICE_IDS (read by JAX itself) picks this process's GPUs when several share a node.
"""
import os
import re
import socket
import time

import jax

DEFAULT_PORT = 12355  # coordinator port when only SLURM variables are set


def _int_env(env, name):
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} must be an integer") from None


def first_host(nodelist):
    """First host name of a SLURM nodelist: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot read a host name from SLURM nodelist {nodelist!r}; set JAX_COORDINATOR_ADDRESS")
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def distributed_config(env=None):
    """Returns (coordinator_address, num_processes, process_id), or None for a single process."""
    env = os.environ if env is None else env
    if "JAX_NUM_PROCESSES" in env:
        n = _int_env(env, "JAX_NUM_PROCESSES")
        if n <= 1:
            return None
        for name in ("JAX_PROCESS_ID", "JAX_COORDINATOR_ADDRESS"):
            if not env.get(name):
                raise ValueError(f"JAX_NUM_PROCESSES={n} but {name} is not set; set JAX_PROCESS_ID to 0..{n - 1} "
                                 "and JAX_COORDINATOR_ADDRESS to host:port of process 0 in every process")
        pid, addr = _int_env(env, "JAX_PROCESS_ID"), env["JAX_COORDINATOR_ADDRESS"]
    elif "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        n = _int_env(env, "SLURM_NTASKS")
        if n <= 1:
            return None
        pid = _int_env(env, "SLURM_PROCID")
        addr = env.get("JAX_COORDINATOR_ADDRESS")
        if not addr:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
            if not nodelist:
                raise ValueError("SLURM_NTASKS > 1 but no SLURM_JOB_NODELIST; set JAX_COORDINATOR_ADDRESS=host:port")
            addr = f"{first_host(nodelist)}:{env.get('JAX_COORDINATOR_PORT', DEFAULT_PORT)}"
    else:
        return None
    if not 0 <= pid < n:
        raise ValueError(f"process id {pid} is outside 0..{n - 1} for {n} processes; fix JAX_PROCESS_ID/SLURM_PROCID")
    if not re.fullmatch(r"[^:\s]+:\d+|\[[0-9a-fA-F:]+\]:\d+", addr):
        raise ValueError(f"coordinator address {addr!r} must be host:port (e.g. 10.0.0.1:12355); "
                         "fix JAX_COORDINATOR_ADDRESS")
    return addr, n, pid


def wait_for_coordinator(addr, timeout):
    """Polls a TCP connect to host:port until it succeeds or `timeout` seconds pass. JAX aborts the whole
    process (a C++ fatal error, not an exception) when the coordinator is unreachable, so check first."""
    host, port = addr.rsplit(":", 1)
    host = host.strip("[]")
    deadline, err = time.monotonic() + timeout, None
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(2.0, max(timeout, 0.1))):
                return
        except OSError as e:
            err = e
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"the coordinator at {addr} was not reachable within {timeout}s ({err}). Check that process 0 "
                "runs on that host, that the port is open and reachable from this host, and that all processes got "
                "the same JAX_COORDINATOR_ADDRESS; JAX_DISTRIBUTED_TIMEOUT sets the wait.")
        time.sleep(0.25)


def maybe_initialize_distributed(env=None):
    """Calls jax.distributed.initialize when more than one process is configured; returns whether it did."""
    env = os.environ if env is None else env
    cfg = distributed_config(env)
    if cfg is None or jax.distributed.is_initialized():
        return False
    addr, n, pid = cfg
    timeout = _int_env(env, "JAX_DISTRIBUTED_TIMEOUT") if "JAX_DISTRIBUTED_TIMEOUT" in env else 300
    if pid != 0:  # process 0 starts the coordinator service itself
        wait_for_coordinator(addr, timeout)
    try:
        jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid,
                                   initialization_timeout=timeout)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix attached
        raise RuntimeError(
            f"process {pid} of {n} could not join the coordinator at {addr} within {timeout}s ({e}). Check that "
            f"process 0 runs on that host, that the port is open and reachable from this host, and that all "
            f"processes got the same JAX_COORDINATOR_ADDRESS; JAX_DISTRIBUTED_TIMEOUT sets the wait.") from e
    return True
