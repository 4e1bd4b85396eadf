"""Run a command with its stderr on a pseudo-terminal, as a user's shell would: what tools that print progress
only on a terminal (`sys.stderr.isatty()`) print there."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios


def run_on_terminal(args: list[str], **kwargs) -> tuple[int, str]:
    """Run `args` with stderr on a pseudo-terminal (stdin empty, stdout discarded); its exit code and stderr."""
    parent, child = pty.openpty()
    # 24 rows of 80 columns: a new pseudo-terminal has 0 columns, in which tqdm draws an empty bar
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=child, **kwargs)
    os.close(child)
    chunks = []
    while True:  # read while it runs: a full terminal buffer would stop the command
        try:
            chunk = os.read(parent, 4096)
        except OSError:  # EIO: every end of the terminal's other side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(parent)
    return proc.wait(), b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
