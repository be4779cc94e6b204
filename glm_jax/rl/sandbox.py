"""Run untrusted, model-written Python against unit tests in a sandboxed subprocess.

    result = run_python(solution_source, test_source, Limits(wall_seconds=5))
    result.reason   # SandboxReason.PASSED, FAILED, TIMEOUT, MEMORY, ...
    result.passed   # reason is PASSED

The solution's source runs first, then the tests' source in the same namespace (the
solution's `__name__` is "solution", so an `if __name__ == "__main__":` block does not run);
the run passes only if every statement of the tests ran. Each run gets:

- a fresh temporary directory as its working directory, deleted afterwards;
- limits: wall time (the parent kills the whole process tree), CPU time (RLIMIT_CPU, per
  process), address space (RLIMIT_AS, per process), size of any file written (RLIMIT_FSIZE),
  bytes written to stdout + stderr (the parent stops reading and kills), and the number of
  processes/threads (a pids cgroup when one can be created, else RLIMIT_NPROC, which the
  kernel does not enforce for root);
- a minimal environment (PATH, HOME = the working directory, LANG; the shell adds PWD) and
  `python -I -B` (no PYTHON* variables, no user site, no bytecode files);
- when the OS allows: new network and PID namespaces (`unshare`): no network but a down
  loopback, and every process the program started dies with it; as root, an unprivileged
  user id (`setpriv`) so the program cannot write outside its directory and /tmp.

What was applied is reported in `SandboxResult.isolation`. Whatever happens (crash, timeout,
infinite loop, memory bomb, fork bomb, sys.exit, output flood), `run_python` returns a result
with one `SandboxReason` within the wall-time limit plus a short grace period; it never hangs.

This contains accidents and the usual reward hacks (exiting early with status 0, flooding
output, forking); it is not a security boundary against a program written to escape it: the
tests run in the same interpreter as the solution, and the file system is the host's (under
the unprivileged uid: readable where world-readable, writable only in /tmp and the run's
directory; without it, whatever the caller may do). Needs util-linux's prlimit (and unshare,
setpriv for the namespaces and the uid); a failure to start is SANDBOX_ERROR.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import Any


class SandboxReason(enum.StrEnum):
    """Why a run ended; every value but PASSED gives reward 0."""

    PASSED = "passed"  # the solution and every test statement ran
    FAILED = "failed"  # an assertion in the tests failed
    SYNTAX_ERROR = "syntax_error"  # the solution or the tests do not compile
    IMPORT_ERROR = "import_error"  # an import failed (missing module or name)
    CRASH = "crash"  # any other uncaught exception, or killed by a signal
    EXIT = "exit"  # the program exited (sys.exit, os._exit) before the tests finished
    TIMEOUT = "timeout"  # wall-time or CPU-time limit
    MEMORY = "memory"  # address-space limit (MemoryError)
    OUTPUT_LIMIT = "output_limit"  # too many bytes on stdout/stderr, or a file too large
    PROCESS_LIMIT = "process_limit"  # could not start another process or thread
    SANDBOX_ERROR = "sandbox_error"  # the sandbox itself failed to run the program


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of one run. Sizes in bytes, times in seconds."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 10  # RLIMIT_CPU soft limit (SIGXCPU); the hard limit is 1 s more
    memory_bytes: int = 1 << 30  # RLIMIT_AS, per process
    output_bytes: int = 1 << 20  # stdout + stderr together
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: the largest file the program may write
    processes: int = 32  # tasks (processes + threads), the sandbox's own 3-4 included


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    reason: SandboxReason
    detail: str  # one line: the exception, signal or limit that ended the run
    stdout: str  # at most Limits.output_bytes, decoded with errors replaced
    stderr: str
    wall_seconds: float  # from starting the subprocess to its end
    isolation: Mapping[str, Any]  # {"network": bool, "pid_namespace": bool, "user": str,
    #                       "python": str, "process_limit": "cgroup" | "rlimit" | "none"}

    @property
    def passed(self) -> bool:
        return self.reason is SandboxReason.PASSED


# Runs inside the sandbox as `python -I -B -c _RUNNER <status fd>`. It reports one JSON line
# {"reason", "detail"} on the status pipe, then leaves with os._exit so that threads the
# solution started cannot keep the run alive. A process the solution forked runs this code's
# handlers too; it must not report, hence the pid check.
_RUNNER = r"""
import errno, json, os, sys
_status_fd = int(sys.argv[1])
_main_pid = os.getpid()
_write, _exit, _getpid, _dumps = os.write, os._exit, os.getpid, json.dumps

def _report(reason, detail):
    if _getpid() != _main_pid:
        _exit(1)
    try:
        sys.stdout.flush(); sys.stderr.flush()
    except BaseException:
        pass
    _write(_status_fd, (_dumps({"reason": reason, "detail": detail[:500]}) + "\n").encode())
    _exit(0)

def _describe(e):
    return (type(e).__name__ + ": " + str(e)).splitlines()[0] if str(e) else type(e).__name__

def _run():
    ns = {"__name__": "solution", "__builtins__": __builtins__}
    codes = []
    for name in ("solution.py", "tests.py"):
        with open(name, encoding="utf-8") as f:
            source = f.read()
        try:
            codes.append(compile(source, name, "exec"))
        except (SyntaxError, ValueError) as e:
            _report("syntax_error", name + ": " + _describe(e))
    phase = "solution"
    try:
        exec(codes[0], ns)
        phase = "tests"
        exec(codes[1], ns)
    except SystemExit as e:
        ns.clear()
        _report("exit", "SystemExit(%r) in the %s" % (e.code, phase))
    except MemoryError as e:
        ns.clear()  # frees what the program held, so that reporting has memory
        _report("memory", "MemoryError in the " + phase)
    except ImportError as e:
        ns.clear()
        _report("import_error", _describe(e))
    except AssertionError as e:
        ns.clear()
        _report("failed" if phase == "tests" else "crash", _describe(e) + " in the " + phase)
    except BlockingIOError as e:  # EAGAIN from fork/clone: the process limit
        ns.clear()
        _report("process_limit", _describe(e))
    except OSError as e:
        ns.clear()  # EFBIG: a file over RLIMIT_FSIZE (Python ignores SIGXFSZ)
        reason = "output_limit" if e.errno == errno.EFBIG else "crash"
        _report(reason, _describe(e) + " in the " + phase)
    except RuntimeError as e:
        ns.clear()
        limit = "can't start new thread" in str(e)
        _report("process_limit" if limit else "crash", _describe(e) + " in the " + phase)
    except BaseException as e:
        ns.clear()
        _report("crash", _describe(e) + " in the " + phase)
    ns.clear()
    _report("passed", "")

_run()
"""

_SANDBOX_UID = 61_000  # + a slot number; ids with no passwd entry and no files
_GRACE_SECONDS = 1.0  # after the program exits, for its pipes to close
# Runs its arguments as a child and exits with its status (128 + N if killed by signal N).
_SHELL_INIT = ("/bin/sh", "-c", '"$@"; exit $?', "sh")


def run_python(solution: str, tests: str, limits: Limits = Limits(), *,
               python: str | None = None) -> SandboxResult:
    """Runs `solution` then `tests` (Python source) in a sandbox; see the module doc.

    python: the interpreter to run them with. Default: this process's interpreter if the
      sandbox's user may run it, else /usr/bin/python3 (as root the program runs under an
      unprivileged user id, which cannot enter e.g. /root/.pyenv); failing both, the
      program runs as root and `isolation["user"]` says so.
    Never raises for anything the program does; raises ValueError for a non-positive limit.
    """
    for field in dataclasses.fields(limits):
        if getattr(limits, field.name) <= 0:
            raise ValueError(f"Limits.{field.name}={getattr(limits, field.name)}: must be > 0")
    with _Slot() as slot, tempfile.TemporaryDirectory(prefix="glm_sandbox_") as workdir:
        for name, source in (("solution.py", solution), ("tests.py", tests)):
            with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
                f.write(source)
        uid = _SANDBOX_UID + slot
        user = _sandbox_user(uid, python)
        if user is not None:
            os.chown(workdir, uid, uid)
            os.chmod(workdir, 0o700)
        interpreter = python or (user or {}).get("python") or sys.executable
        cgroup = _PidsCgroup.create(f"glm_sandbox_{os.getpid()}_{slot}", limits.processes)
        isolation = {"network": _namespaces_available(), "pid_namespace": _namespaces_available(),
                     "user": f"uid {uid}" if user else f"unchanged (uid {os.getuid()})",
                     "python": interpreter,
                     # RLIMIT_NPROC binds any user but root.
                     "process_limit": "cgroup" if cgroup else "rlimit" if user or os.geteuid()
                     else "none"}
        try:
            return _execute(interpreter, workdir, limits, cgroup, uid if user else None,
                            isolation)
        finally:
            if cgroup:
                cgroup.destroy()


def _execute(interpreter: str, workdir: str, limits: Limits, cgroup: _PidsCgroup | None,
             uid: int | None, isolation: dict) -> SandboxResult:
    status_read, status_write = os.pipe()
    command = _command(interpreter, status_write, limits, cgroup, uid)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"}
    start = time.monotonic()  # the limit starts here, after the one-time probes
    try:
        proc = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(status_write,), start_new_session=True)
    except OSError as e:
        os.close(status_read)
        os.close(status_write)
        return SandboxResult(SandboxReason.SANDBOX_ERROR, f"could not start: {e}", "", "",
                             time.monotonic() - start, isolation)
    os.close(status_write)
    out = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    status = bytearray()
    deadline = start + limits.wall_seconds
    over_time = over_output = False
    exited_at = None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        sel.register(status_read, selectors.EVENT_READ)
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                over_time = True
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > _GRACE_SECONDS:
                break  # something the program started still holds a pipe open
            for key, _ in sel.select(timeout=min(deadline - now, 0.05)):
                fd = key.fd
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                elif fd == status_read:
                    status += chunk[:4096]
                else:
                    out[fd] += chunk
                    if sum(len(b) for b in out.values()) > limits.output_bytes:
                        over_output = True
            if over_output:
                break
    _kill(proc, cgroup)
    os.close(status_read)
    stdout, stderr = (bytes(b[:limits.output_bytes]).decode(errors="replace")
                      for b in out.values())
    reason, detail = _classify(proc.returncode, status, over_time, over_output, stderr, limits)
    return SandboxResult(reason, detail, stdout, stderr, time.monotonic() - start, isolation)


def _classify(returncode: int, status: bytes, over_time: bool, over_output: bool, stderr: str,
              limits: Limits) -> tuple[SandboxReason, str]:
    if over_time:
        return SandboxReason.TIMEOUT, f"wall time over {limits.wall_seconds} s"
    if over_output:
        return SandboxReason.OUTPUT_LIMIT, f"stdout + stderr over {limits.output_bytes} bytes"
    if status:
        try:
            report = json.loads(bytes(status).splitlines()[0])
            return SandboxReason(report["reason"]), str(report["detail"])
        except (ValueError, KeyError, IndexError):
            return SandboxReason.CRASH, "unreadable status report"
    # No report: the program ended the interpreter itself, or the kernel did. The shell
    # between the namespace and Python turns "killed by signal N" into exit code 128 + N.
    sig = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if sig == signal.SIGXCPU:
            return SandboxReason.TIMEOUT, f"CPU time over {limits.cpu_seconds} s ({name})"
        if sig == signal.SIGXFSZ:
            return SandboxReason.OUTPUT_LIMIT, f"a file over {limits.file_bytes} bytes ({name})"
        if sig == signal.SIGKILL:  # not ours (over_time is handled above): RLIMIT_CPU's hard
            # limit, reached by a program that ignored SIGXCPU (or that killed itself)
            return SandboxReason.TIMEOUT, f"CPU time over {limits.cpu_seconds + 1} s ({name})"
        return SandboxReason.CRASH, f"killed by {name}"
    if "MemoryError" in stderr:
        return SandboxReason.MEMORY, "MemoryError"
    return SandboxReason.EXIT, (f"the interpreter exited with status {returncode} before the "
                                "tests finished")


def _command(interpreter: str, status_fd: int, limits: Limits, cgroup: _PidsCgroup | None,
             uid: int | None) -> list[str]:
    """sh (joins the cgroup) -> prlimit -> unshare -> setpriv -> sh (the namespace's init) ->
    python. Each link execs the next, in the child: no Python code runs between fork and
    exec (subprocess's preexec_fn is unsafe when the caller scores rewards from threads)."""
    cmd: list[str] = []
    if cgroup:
        cmd += ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', cgroup.procs_file]
    cmd += [shutil.which("prlimit") or "prlimit",
            f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 1}",
            f"--as={limits.memory_bytes}", f"--fsize={limits.file_bytes}",
            f"--nproc={_nproc_limit(limits.processes, uid)}", "--core=0", "--"]
    if _namespaces_available():
        cmd += ["unshare", "--net", "--pid", "--fork", "--kill-child"]
    if uid is not None:
        cmd += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                "--no-new-privs", "--"]
    # PID 1 of a namespace ignores signals it has no handler for (SIGXCPU included), so
    # Python runs as its child; `; exit $?` stops the shell from exec-ing into it.
    cmd += [*_SHELL_INIT, interpreter, "-I", "-B", "-c", _RUNNER, str(status_fd)]
    return cmd


def _nproc_limit(processes: int, uid: int | None) -> int:
    """RLIMIT_NPROC counts every task of the user, not of the run. A fresh sandbox uid has
    none, so the run's budget is the limit; the caller's own uid (not root) already has
    some, which are added, or the run could not even start its interpreter."""
    if uid is not None or os.geteuid() == 0:
        return processes
    return processes + _tasks_of_uid(os.getuid())


def _tasks_of_uid(uid: int) -> int:
    """Processes + threads of `uid` now, from /proc (0 where /proc is not readable)."""
    count = 0
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass  # exited meanwhile
    return count


def _kill(proc: subprocess.Popen, cgroup: _PidsCgroup | None) -> None:
    """Kills everything the run started: the session (the program could have left it with
    setsid, but then the namespace's end or the cgroup still gets it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if cgroup:
        cgroup.kill_all()
    proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        pipe.close()


@functools.cache
def _namespaces_available() -> bool:
    """Whether `unshare --net --pid` works here (root, or a kernel that lets users create
    user namespaces is not enough: the flags used need CAP_SYS_ADMIN)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    try:
        return subprocess.run(["unshare", "--net", "--pid", "--fork", "--kill-child", "true"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@functools.cache
def _python_for_uid(uid: int, python: str | None) -> str | None:
    """An interpreter the unprivileged uid can run: `python`, else ours, else the system's."""
    candidates = [python] if python else [sys.executable, "/usr/bin/python3"]
    for candidate in candidates:
        try:
            # Through the same shell as a run: exec-ing the interpreter straight from
            # setpriv succeeded here where the shell's exec of it was refused.
            ok = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}",
                                 "--clear-groups", "--", *_SHELL_INIT, candidate, "-I", "-c",
                                 "pass"], capture_output=True, timeout=20, cwd="/").returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return candidate
    return None


def _sandbox_user(uid: int, python: str | None) -> dict | None:
    """As root with setpriv: {"python": an interpreter the uid can run}; else None."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return None
    # Probed with the first slot's uid: every slot's uid sees the same files.
    interpreter = _python_for_uid(_SANDBOX_UID, python)
    return {"python": interpreter} if interpreter else None


_slots_lock = threading.Lock()
_slots_in_use: set[int] = set()


class _Slot:
    """A small integer unique among this process's concurrent runs (uid and cgroup name)."""

    def __enter__(self) -> int:
        with _slots_lock:
            self.n = next(i for i in range(len(_slots_in_use) + 1) if i not in _slots_in_use)
            _slots_in_use.add(self.n)
        return self.n

    def __exit__(self, *exc) -> None:
        with _slots_lock:
            _slots_in_use.discard(self.n)


@dataclasses.dataclass
class _PidsCgroup:
    """A pids cgroup (v1 `pids` hierarchy or v2 with the pids controller) capping the tasks
    of one run; RLIMIT_NPROC alone does not bind root, and counts all of a user's processes.
    The kernel's pids controller and a directory per run is all there is to it."""

    path: str

    @property
    def procs_file(self) -> str:
        return os.path.join(self.path, "cgroup.procs")

    @classmethod
    def create(cls, name: str, max_tasks: int) -> _PidsCgroup | None:
        for base in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup"):
            path = os.path.join(base, name)
            try:
                os.mkdir(path)
            except OSError:
                continue
            if not os.path.exists(os.path.join(path, "pids.max")):
                os.rmdir(path)  # a plain directory (no pids controller here), not a cgroup
                continue
            try:
                with open(os.path.join(path, "pids.max"), "w") as f:
                    f.write(str(max_tasks))
                return cls(path)
            except OSError:
                os.rmdir(path)
        return None

    def kill_all(self) -> None:
        for _ in range(100):
            try:
                with open(self.procs_file) as f:
                    pids = [int(p) for p in f.read().split()]
            except OSError:
                return
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)

    def destroy(self) -> None:
        self.kill_all()
        for _ in range(100):  # the last tasks may take a moment to leave after SIGKILL
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)
