"""Start one script as several JAX processes on this machine, as a multi-host run would.

Each process gets the environment :func:`examples.parallel.initialize_from_env`
reads (the coordinator on a free localhost port, the number of processes,
its own id) and ``--devices`` CPU devices of its own. The script's output
comes back line by line, each line prefixed with the process id. The launch
fails (exit code of the first failing process) as soon as any process fails,
and the others are stopped; ``--timeout`` stops them all after that long.

Usage::

    python examples/launch.py --processes 2 --devices 2 -- \\
        examples/train_lm.py --quick --width 128 --recipes mxfp8 --sharding fsdp

There is no communication here: the processes find each other through JAX's
coordination service (``jax.distributed.initialize``) and their devices
exchange data through JAX's collectives (gloo on CPU).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

ENV_COORDINATOR = "JAXMX_COORDINATOR"  # the names examples/parallel.py reads
ENV_NUM_PROCESSES = "JAXMX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXMX_PROCESS_ID"
_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(rank: int, processes: int, devices: int, port: int, base=None) -> dict[str, str]:
    """The environment of process ``rank``: coordinator, counts, its CPU devices."""
    env = dict(os.environ if base is None else base)
    flags = _DEVICE_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
    env.update(
        {
            ENV_COORDINATOR: f"localhost:{port}",
            ENV_NUM_PROCESSES: str(processes),
            ENV_PROCESS_ID: str(rank),
            "JAX_PLATFORMS": "cpu",
            "JAX_NUM_CPU_DEVICES": str(devices),
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _forward(stream, prefix: str, sink, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            sink.write(f"{prefix}{line}" if line.endswith("\n") else f"{prefix}{line}\n")
            sink.flush()
    stream.close()


def _stop(procs: Sequence[subprocess.Popen], grace: float = 5.0) -> None:
    """Stops every process still running: SIGTERM to its group, then SIGKILL."""
    for p in procs:
        if p.poll() is None:
            _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(p, signal.SIGKILL)
            p.wait()


def _signal(p: subprocess.Popen, sig) -> None:
    # Each child leads its own process group (start_new_session), so this
    # reaches what it started and nothing else.
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def launch(
    command: Sequence[str],
    *,
    processes: int,
    devices: int,
    timeout: float | None = None,
    sink=None,
    port: int | None = None,
) -> int:
    """Runs ``python command...`` as ``processes`` JAX processes; returns an exit code.

    Args:
      command: the script and its arguments (run with this Python).
      processes: how many processes.
      devices: CPU devices per process.
      timeout: seconds before every process is stopped (exit code 124).
      sink: where the prefixed output goes (default stdout).
      port: the coordinator's port (default: a free one).

    Returns:
      0 if every process exited with 0; else the first failure's exit code
      (124 on timeout).
    """
    if processes < 1 or devices < 1:
        raise ValueError(f"need processes >= 1 and devices >= 1, got {processes} and {devices}")
    if not command:
        raise ValueError("no script to run: give it after --")
    sink = sys.stdout if sink is None else sink
    port = free_port() if port is None else port
    lock = threading.Lock()
    procs, threads = [], []
    try:
        for rank in range(processes):
            p = subprocess.Popen(
                [sys.executable, *command],
                env=process_env(rank, processes, devices, port),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            procs.append(p)
            t = threading.Thread(target=_forward, args=(p.stdout, f"[p{rank}] ", sink, lock))
            t.daemon = True
            t.start()
            threads.append(t)
        deadline = None if timeout is None else time.monotonic() + timeout
        code = None
        while code is None:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                code = failed[0]
            elif all(c == 0 for c in codes):
                code = 0
            elif deadline is not None and time.monotonic() > deadline:
                with lock:
                    sink.write(f"[launch] timeout after {timeout:.0f} s: stopping every process\n")
                code = 124
            else:
                time.sleep(0.05)
        if code != 0:
            ranks = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            with lock:
                sink.write(f"[launch] process(es) {ranks} failed (exit code {code})\n")
        return code
    finally:
        _stop(procs)
        for t in threads:
            t.join(timeout=5)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], usage="%(prog)s [options] -- script.py [args...]"
    )
    parser.add_argument("--processes", type=int, default=2, help="JAX processes to start")
    parser.add_argument("--devices", type=int, default=2, help="CPU devices per process")
    parser.add_argument("--timeout", type=float, help="seconds before all are stopped")
    parser.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="script.py and its arguments")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the script to run after --")
    return launch(
        command,
        processes=args.processes,
        devices=args.devices,
        timeout=args.timeout,
        port=args.port,
    )


if __name__ == "__main__":
    sys.exit(main())
