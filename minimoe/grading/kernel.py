"""An IPython kernel that runs one student notebook for the grader, one piece of code at a time.

The kernel is the grader's own Python (`sys.executable`, like nbval's --nbval-current-env). It
starts in `folder/work` (its working directory), talks to the grader over Unix sockets in
`folder/exchange` (where the grader also puts inputs and the kernel its results), and writes
its log to `folder/kernel.log`. With sandbox=True it runs inside bubblewrap (`bwrap`): read-only
views of the system folders (SYSTEM_FOLDERS), of Python's prefixes and of minimoe's package
folder; `work` and `exchange` writable; a private /tmp, /proc and /dev (plus GPUs' /dev/nvidia*);
no network, no other process; nothing else, so neither the repository, nor the reference
notebooks, nor other students' notebooks.

Each `execute` returns the kernel's reply status (not what the code printed). A cell that runs
past its timeout is interrupted (the error says Timeout); a kernel that does not stop then, or
that dies, is gone: this and every later execute reports that.
"""

import glob
import json
import queue
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import minimoe

SYSTEM_FOLDERS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc")
INTERRUPT_GRACE = 10.0  # seconds a kernel gets to stop after an interrupt before it is killed
STARTUP_TIMEOUT = 60.0


class KernelError(Exception):
    """The kernel did not start."""


@dataclass(frozen=True)
class Reply:
    ok: bool
    error: str = ""  # why not: "ZeroDivisionError: division by zero", "Timeout: ...", "the kernel died ..."


def sandbox_available() -> bool:
    return shutil.which("bwrap") is not None


def sandbox_folders() -> list[str]:
    """The folders a sandboxed kernel can read: the system's, Python's and minimoe's package."""
    python = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    return [*SYSTEM_FOLDERS, *sorted(python), str(Path(minimoe.__file__).resolve().parent)]


def _sandbox(work: Path, exchange: Path) -> list[str]:
    command = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--tmpfs", "/tmp",
               "--proc", "/proc", "--dev", "/dev"]
    for folder in sandbox_folders():
        command += ["--ro-bind-try", folder, folder]
    for device in sorted(glob.glob("/dev/nvidia*")):
        command += ["--dev-bind", device, device]
    for folder in (work, exchange):
        command += ["--bind", str(folder), str(folder)]
    return command + ["--chdir", str(work), "--setenv", "HOME", str(work), "--setenv", "TMPDIR", "/tmp",
                      "--unsetenv", "JPY_PARENT_PID", "--"]  # the kernel's parent is not in its namespace


class Kernel:
    """A kernel for one notebook; use as a context manager (starts on enter, killed on exit)."""

    def __init__(self, folder: Path, sandbox: bool = False):
        from jupyter_client import KernelManager
        from jupyter_client.kernelspec import KernelSpecManager

        self.work, self.exchange, self.log = folder / "work", folder / "exchange", folder / "kernel.log"
        specs = folder / "kernelspec"
        for path in (self.work, self.exchange, specs / "minimoe-grade"):
            path.mkdir(parents=True)
        argv = [*(_sandbox(self.work, self.exchange) if sandbox else []), sys.executable, "-m", "ipykernel_launcher",
                "-f", "{connection_file}", "--HistoryManager.hist_file=:memory:"]
        (specs / "minimoe-grade" / "kernel.json").write_text(json.dumps(
            {"argv": argv, "display_name": "minimoe grade", "language": "python", "interrupt_mode": "message"}))
        self.manager = KernelManager(kernel_name="minimoe-grade", kernel_spec_manager=KernelSpecManager(
            kernel_dirs=[str(specs)]), transport="ipc", ip=str(self.exchange / "kernel"),
            connection_file=str(self.exchange / "connection.json"))
        self.client = None
        self.gone = ""  # why the kernel is gone, once it is

    def __enter__(self) -> "Kernel":
        try:
            with open(self.log, "wb") as log:
                self.manager.start_kernel(cwd=str(self.work), stdout=log, stderr=log)
            self.client = self.manager.client()
            self.client.start_channels()
            self.client.wait_for_ready(timeout=STARTUP_TIMEOUT)
        except (OSError, RuntimeError) as error:
            self.__exit__()
            tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
            raise KernelError(f"the kernel did not start ({error}): {' | '.join(tail)}"[:400]) from None
        return self

    def __exit__(self, *exc) -> None:
        if self.client is not None:
            self.client.stop_channels()
        if self.manager.has_kernel:
            self.manager.shutdown_kernel(now=True)

    def execute(self, code: str, timeout: float, silent: bool = False) -> Reply:
        """Run code; its reply status, waiting at most `timeout` seconds (then interrupting it)."""
        if self.gone:
            return Reply(False, f"not run: {self.gone}")
        msg_id = self.client.execute(code, silent=silent, store_history=not silent, allow_stdin=False,
                                     stop_on_error=False)
        deadline, interrupted = time.monotonic() + timeout, False
        while True:
            try:
                reply = self.client.get_shell_msg(timeout=0.2)
            except queue.Empty:
                if not self.manager.is_alive():
                    self.gone = "the kernel died"
                    return Reply(False, "the kernel died while running this cell")
                if time.monotonic() > deadline:
                    if interrupted:
                        self.manager.shutdown_kernel(now=True)
                        self.gone = f"the kernel did not stop {INTERRUPT_GRACE:g} s after a timeout and was killed"
                        return Reply(False, f"Timeout: ran more than {timeout:g} s, and did not stop")
                    self.manager.interrupt_kernel()
                    deadline, interrupted = time.monotonic() + INTERRUPT_GRACE, True
                continue
            if reply["parent_header"].get("msg_id") != msg_id:
                continue
            content = reply["content"]
            if interrupted:
                return Reply(False, f"Timeout: ran more than {timeout:g} s")
            if content.get("status") == "ok":
                return Reply(True)
            error = f"{content.get('ename', 'Error')}: {content.get('evalue', content.get('status'))}"
            return Reply(False, error[:300])
