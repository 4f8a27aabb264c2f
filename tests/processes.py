"""Running the processes of a multi-process test and reading what they print.

A test that starts processes (workers of a distributed run) starts them all
at once on 127.0.0.1, waits for them until a deadline, and kills what is left,
so that a stuck collective fails the test instead of hanging it.
"""

import json
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple


def parse_json_lines(stdout, key):
    """{the value of `key`: the rest} of each JSON line in `stdout`."""
    found = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            found[result.pop(key)] = result
    return found


def free_ports(count):
    """`count` distinct ports that were free on 127.0.0.1 a moment ago."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        # Bound together, so that the system cannot hand out one port twice.
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class Finished(NamedTuple):
    """A process's exit status (None: killed at the deadline) and output."""

    returncode: int | None
    stdout: str
    stderr: str


def run_together(commands, envs, timeout=600):
    """Runs the commands at once, in the tests' folder, until all end.

    Each process that has not ended `timeout` seconds after the start is
    killed, as is every process if this one is interrupted. Output goes to
    files, not pipes: a process blocked on a full pipe would stall the
    others at their next collective.
    """
    processes, outputs = [], []
    try:
        for command, env in zip(commands, envs):
            stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            outputs.append((stdout, stderr))
            processes.append(
                subprocess.Popen(
                    command,
                    stdout=stdout,
                    stderr=stderr,
                    text=True,
                    cwd=Path(__file__).parent,
                    env=env,
                )
            )
        deadline = time.monotonic() + timeout
        returncodes = []
        for process in processes:
            try:
                returncodes.append(
                    process.wait(timeout=max(deadline - time.monotonic(), 0.1))
                )
            except subprocess.TimeoutExpired:
                returncodes.append(None)
    finally:
        for process in processes:
            process.kill()
            process.wait()
    finished = []
    for returncode, (stdout, stderr) in zip(returncodes, outputs):
        with stdout, stderr:
            stdout.seek(0)
            stderr.seek(0)
            finished.append(Finished(returncode, stdout.read(), stderr.read()))
    return finished


def describe(finished):
    """Each process's exit status and the end of its stderr."""
    described = []
    for index, process in enumerate(finished):
        if process.returncode is None:
            status = "killed at the deadline"
        else:
            status = f"exit status {process.returncode}"
        described.append(f"process {index}: {status}\n{process.stderr[-2000:]}")
    return "\n".join(described)
