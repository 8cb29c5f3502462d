"""Run untrusted Python (a model's completion) against tests, contained, and prove a pass with a secret token.

Isolation, strongest first (``Sandbox(backend="auto")`` picks the first that works on this machine):

- ``bwrap``: bubblewrap in fresh user, PID, network, mount, IPC and UTS namespaces; a new root holding only
  read-only binds of ``/usr`` (and the ``/bin``, ``/lib*`` links), ``/etc/ld.so.cache`` and the interpreter; no
  ``/home``, rest of ``/etc``, ``/root`` or project folder at all; size-capped tmpfs for the working folder,
  ``/tmp`` and ``/dev/shm``. The harness is the namespace's init (pid 1), which its candidate cannot kill.
- ``unshare``: util-linux ``unshare`` with the same namespaces, a tmpfs root built by a small shell script with
  the same read-only binds, then ``chroot`` and every capability dropped (``setpriv``).
- ``process``: no namespaces (network and host filesystem reachable as the sandbox user); only an unprivileged
  uid, rlimits, a private working folder and process-tree killing. Never chosen by ``auto``: ask for it by name.

In every backend, started as root, the candidate runs as an unprivileged host uid (``uid``/``gid``, 65534
``nobody`` by default): Linux does not enforce ``RLIMIT_NPROC`` for root, so a fork bomb started as root gets
through. The trusted harness inside the sandbox sets the rlimits of :class:`SandboxLimits` (CPU time, address
space, file size, open files, processes) before any candidate code runs; where a writable ``pids`` cgroup
exists (v2, or the v1 ``pids`` hierarchy) each run also gets its own ``pids.max``. On the wall-clock timeout the
whole process group, the cgroup and, through the PID namespace, every process the candidate started are killed;
nothing is left behind (the tmpfs dies with the mount namespace, the cgroup folder is removed). The sandbox
also dies with the process that started it (``setpriv --pdeathsig``), so a reward worker killed on its own
time limit leaves nothing running.

A pass is counted only when the harness writes ``S`` + a random token + the per-test results to a separate
pipe (an inherited file descriptor, never stdout) after the tests returned. The token reaches the harness on a
memfd that is closed before candidate code runs, so ``exit(0)``, ``os._exit``, ``raise SystemExit`` inside a
test, a crash, or printing "all tests passed" cannot produce a pass. The harness keeps its own references to
``exec``/``compile`` and runs the tests with a pristine copy of the builtins, so replacing builtins cannot
fake one either. Known limit: candidate and tests share one interpreter, so a candidate written to read the
harness's frames or memory could find the token; containment does not depend on the token, scoring does.
stdin/stdout cases are safer: each runs in a child process of a non-dumpable harness and the expected output
never enters the sandbox (the host compares).

This module must never run candidate code outside the sandbox, nor write anywhere on the host except its own
cgroup folder (and, for the ``process`` backend only, a private working folder it removes).
"""

from __future__ import annotations

import atexit
import json
import logging
import marshal
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

Backend = Literal["auto", "bwrap", "unshare", "process"]
_ISOLATING_BACKENDS: tuple[str, ...] = ("bwrap", "unshare")
_WORKDIR = "/sandbox"  # the candidate's working folder inside the namespaced backends


class SandboxError(RuntimeError):
    """The sandbox itself failed (could not start, harness never ran): the candidate could not be judged."""


class SandboxUnavailableError(SandboxError):
    """No isolating backend works on this machine; the message says what was tried and how to fix it."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one sandboxed run (one candidate against all of its tests)."""

    wall_time_s: float = 6.0
    """Wall-clock limit for the whole run; on expiry every process of the sandbox is killed. Keep it below the
    reward pool's per-sample ``timeout_s`` (10 s by default), so that a hanging candidate scores 0 here instead
    of costing its worker and scoring None there."""
    test_time_s: float | None = 4.0
    """Limit for each Python test or stdin/stdout case (an interval timer in the harness); None: wall_time_s."""
    cpu_time_s: int = 6
    """RLIMIT_CPU of every sandboxed process, seconds."""
    memory_bytes: int = 2 << 30
    """RLIMIT_AS (address space) of every sandboxed process."""
    file_size_bytes: int = 16 << 20
    """RLIMIT_FSIZE: the largest file a sandboxed process may write."""
    open_files: int = 64
    """RLIMIT_NOFILE."""
    processes: int = 32
    """RLIMIT_NPROC (threads count too) and, where a pids cgroup is writable, its pids.max."""
    tmpfs_bytes: int = 64 << 20
    """Size of each tmpfs: the working folder, /tmp and /dev/shm."""
    output_bytes: int = 64 << 10
    """How much of the sandbox's stdout+stderr is kept for diagnostics (the rest is read and dropped)."""
    case_output_bytes: int = 1 << 20
    """How much of each stdin/stdout case's output is compared; longer output fails the case."""

    def __post_init__(self) -> None:
        for name in (
            "wall_time_s",
            "cpu_time_s",
            "memory_bytes",
            "file_size_bytes",
            "open_files",
            "processes",
            "tmpfs_bytes",
            "output_bytes",
            "case_output_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive number, got {value!r}")
        if self.test_time_s is not None and self.test_time_s <= 0:
            raise ValueError(f"SandboxLimits.test_time_s must be positive or None, got {self.test_time_s!r}")
        if self.open_files < 16:
            raise ValueError(
                f"SandboxLimits.open_files must be at least 16 (the interpreter needs some), got {self.open_files}"
            )
        if self.processes < 4:
            raise ValueError(f"SandboxLimits.processes must be at least 4, got {self.processes}")

    @property
    def per_test_s(self) -> float:
        return float(self.test_time_s if self.test_time_s is not None else self.wall_time_s)


@dataclass(frozen=True)
class SandboxInfo:
    """What isolation a :class:`Sandbox` really gives on this machine (from a probe run, not from assumptions)."""

    backend: str
    uid: int
    gid: int
    unprivileged: bool
    """The candidate runs as a non-root host uid, so RLIMIT_NPROC holds."""
    namespaces: tuple[str, ...]
    filesystem: str
    network: str
    pids_cgroup: str | None
    """The cgroup folder under which each run gets its own pids.max, or None where none is writable."""
    python: str
    notes: tuple[str, ...] = ()


@dataclass
class SandboxResult:
    """The outcome of one candidate: which tests passed, and why not when none did."""

    passed: list[bool]
    token_ok: bool
    timed_out: bool
    exit_code: int | None
    output: str
    duration_s: float
    outputs: list[str] = field(default_factory=list)
    """stdin/stdout mode: what each case printed (capped), for diagnostics."""

    @property
    def fraction(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else 0.0

    @property
    def all_passed(self) -> bool:
        return bool(self.passed) and all(self.passed)


# ----------------------------------------------------------------------------------------------------------------
# The harness: trusted code that runs inside the sandbox, reads the job from a memfd, sets the rlimits, runs the
# candidate and its tests, and writes "S" (started), then token + "\n" + results, to the result pipe.

_HARNESS = r"""
import os, sys
def _harness():
    write, exit_, read, close = os.write, os._exit, os.read, os.close
    job_fd, res_fd = int(sys.argv[1]), int(sys.argv[2])
    chunks = []
    while True:
        chunk = read(job_fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    close(job_fd)
    import _signal as signal, builtins, marshal, resource  # json, signal would import re and enum: slow starts
    job = marshal.loads(b"".join(chunks))
    del chunks
    for name, value in job["rlimits"]:
        resource.setrlimit(getattr(resource, name), (value, value))
    token = job.pop("token").encode()
    write(res_fd, b"S")
    if job["mode"] == "tests":
        payload = _run_tests(job, builtins, signal)
    else:
        payload = _run_io(job, signal)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    try:
        write(res_fd, token + b"\n" + payload)
    finally:
        exit_(0)

def _run_tests(job, builtins, signal):
    exec_, compile_, dict_, bytes_ = exec, compile, dict, bytes
    pristine = dict_(builtins.__dict__)
    setitimer, REAL = signal.setitimer, signal.ITIMER_REAL
    class _Timeout(BaseException):
        pass
    def _alarm(signum, frame):
        raise _Timeout()
    signal.signal(signal.SIGALRM, _alarm)
    per_test = job["test_time_s"]
    entry_point = job["entry_point"]
    namespace = {"__name__": "__candidate__", "__builtins__": builtins}
    results = []
    loaded = False
    try:
        setitimer(REAL, per_test)
        exec_(compile_(job["program"], "<candidate>", "exec"), namespace)
        setitimer(REAL, 0)
        loaded = True
    except BaseException:
        setitimer(REAL, 0)
    for test in job["tests"]:
        ok = False
        if loaded:
            try:
                scope = dict_(namespace)
                scope["__builtins__"] = dict_(pristine)
                setitimer(REAL, per_test)
                exec_(compile_(test, "<test>", "exec"), scope)
                if entry_point:
                    scope["check"](namespace[entry_point])
                setitimer(REAL, 0)
                ok = True
            except BaseException:
                setitimer(REAL, 0)
                ok = False
        results.append(49 if ok else 48)
    return bytes_(results)

def _run_io(job, signal):
    import ctypes, json, subprocess
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: candidates (same uid) cannot ptrace or read us
    program = os.path.join(os.getcwd(), "main.py")
    with open(program, "w", encoding="utf-8") as f:
        f.write(job["program"])
    cap = job["case_output_bytes"]
    results = []
    for index, case_input in enumerate(job["inputs"]):
        in_path, out_path = "case%d.in" % index, "case%d.out" % index
        with open(in_path, "w", encoding="utf-8") as f:
            f.write(case_input)
        timed_out, code = False, None
        with open(in_path, "rb") as fin, open(out_path, "wb") as fout:
            try:
                code = subprocess.run([sys.executable, "-I", program], stdin=fin, stdout=fout,
                                      stderr=subprocess.DEVNULL, timeout=job["test_time_s"]).returncode
            except subprocess.TimeoutExpired:
                timed_out = True
        try:
            os.kill(-1, signal.SIGKILL)  # whatever the case left running (never pid 1, never us)
        except OSError:
            pass
        with open(out_path, "rb") as f:
            out = f.read(cap + 1)
        for path in (in_path, out_path):
            os.unlink(path)
        results.append([code, timed_out, len(out) > cap, out[:cap].decode("utf-8", "replace")])
    return json.dumps(results).encode()

_harness()
"""


# ----------------------------------------------------------------------------------------------------------------
# Host side


def _world_reachable(path: Path) -> bool:
    """True when an unrelated user can traverse every folder above ``path`` and execute it."""
    path = path.resolve()
    if not path.is_file() or not path.stat().st_mode & stat.S_IXOTH:
        return False
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in path.parents)


def find_sandbox_python() -> str:
    """The interpreter candidates run under: this one if the sandbox user can reach it, else a system python3.

    A virtual environment's or pyenv's interpreter under ``/root`` is not reachable by an unprivileged user;
    the candidate only needs the standard library, so a system ``python3`` of the same minor version is
    preferred, then any system ``python3``.
    """
    own = Path(sys.executable).resolve()
    if _world_reachable(own):
        return str(own)
    minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (f"/usr/bin/{minor}", f"/usr/local/bin/{minor}", "/usr/bin/python3", "/usr/local/bin/python3"):
        if Path(candidate).exists() and _world_reachable(Path(candidate)):
            return str(Path(candidate).resolve())
    raise SandboxUnavailableError(
        f"no Python interpreter the sandbox user can execute: {own} sits under a folder others cannot enter, and "
        "there is no /usr/bin/python3; install one (apt-get install -y python3) or pass Sandbox(python=...)"
    )


class _PidsCgroup:
    """A parent folder in a writable ``pids`` cgroup hierarchy (v2 or v1) under which each run gets a child."""

    def __init__(self, base: Path, version: int) -> None:
        self.base, self.version = base, version
        self._counter = 0
        self._lock = threading.Lock()

    @staticmethod
    def find() -> _PidsCgroup | None:
        if os.geteuid() != 0:
            return None
        try:
            own = Path("/proc/self/cgroup").read_text().splitlines()
            mounts = Path("/proc/self/mountinfo").read_text().splitlines()
        except OSError:
            return None
        paths: dict[str, str] = {}
        for line in own:
            num, controllers, path = line.split(":", 2)
            paths["v2" if num == "0" else controllers] = path
        candidates: list[tuple[Path, int]] = []
        for line in mounts:
            pre, _, post = line.partition(" - ")
            fields, post_fields = pre.split(), post.split()
            if len(post_fields) < 3:
                continue
            fstype, mount_point, options = post_fields[0], fields[4], post_fields[2]
            if fstype == "cgroup2" and "v2" in paths:
                candidates.append((Path(mount_point) / paths["v2"].lstrip("/"), 2))
            elif fstype == "cgroup" and "pids" in options.split(","):
                key = next((k for k in paths if "pids" in k.split(",")), None)
                if key is not None:
                    candidates.append((Path(mount_point) / paths[key].lstrip("/"), 1))
        for own_dir, version in candidates:
            _remove_stale_bases(own_dir)
            base = own_dir / f"posttrain-sandbox-{os.getpid()}"
            if version == 2:  # children see pids only if every level enables it; works where the level is empty
                try:
                    (own_dir / "cgroup.subtree_control").write_text("+pids")
                except OSError:
                    pass
            try:
                base.mkdir(exist_ok=True)
                if version == 2:
                    (base / "cgroup.subtree_control").write_text("+pids")
                probe = base / "probe"
                probe.mkdir(exist_ok=True)
                ok = (probe / "pids.max").exists()
                probe.rmdir()
                if ok:
                    atexit.register(_remove_quietly, base)
                    return _PidsCgroup(base, version)
                base.rmdir()
            except OSError:
                _remove_quietly(base)
        return None

    def create(self, max_pids: int) -> Path:
        with self._lock:
            self._counter += 1
            path = self.base / f"run-{self._counter}-{secrets.token_hex(4)}"
        path.mkdir()
        (path / "pids.max").write_text(str(max_pids))
        return path

    def kill_and_remove(self, path: Path) -> None:
        """Kill every process left in the run's cgroup, wait until it is empty, and remove it."""
        deadline = time.monotonic() + 5.0
        while True:
            try:
                pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
            except FileNotFoundError:
                return
            if not pids:
                try:
                    path.rmdir()
                    return
                except OSError:  # a process is still being torn down
                    pass
            if (path / "cgroup.kill").exists():
                (path / "cgroup.kill").write_text("1")
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                logger.error("sandbox cgroup %s still holds processes %s after 5 s", path, pids)
                return
            time.sleep(0.01)


def _remove_stale_bases(own_dir: Path) -> None:
    """Remove the (empty) cgroup folders of earlier processes that were killed before their atexit ran."""
    try:
        stale = [
            p for p in own_dir.glob("posttrain-sandbox-*") if not Path(f"/proc/{p.name.rsplit('-', 1)[1]}").exists()
        ]
    except OSError:
        return
    for base in stale:
        for run in base.glob("run-*"):
            _remove_quietly(run)
        _remove_quietly(base)


def _remove_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _root_binds() -> list[str]:
    """bwrap arguments that give the sandbox /usr read-only and the merged-/usr links (or binds) beside it."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        p = Path(name)
        if p.is_symlink():
            args += ["--symlink", os.readlink(p), name]
        elif p.is_dir():
            args += ["--ro-bind", name, name]
    if Path("/etc/ld.so.cache").exists():
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    return args


def _python_prefix(python: str) -> str | None:
    """The folder to bind so ``python`` and its standard library exist in the sandbox (None: /usr has it)."""
    prefix = Path(python).resolve().parent.parent
    if prefix == Path("/usr") or Path("/usr") in prefix.parents:
        return None
    return str(prefix)


_UNSHARE_SETUP = r"""
set -e
mount -t tmpfs -o size="$SB_TMPFS",mode=755 tmpfs /tmp
mkdir -p /tmp/root && mount --bind /tmp/root /tmp/root && cd /tmp/root
mkdir -p usr proc dev tmp sandbox etc
mount --rbind /usr usr && mount -o remount,bind,ro usr
for d in bin sbin lib lib32 lib64 libx32; do
  if [ -L /$d ]; then ln -s "$(readlink /$d)" $d; elif [ -d /$d ]; then mkdir $d && mount --rbind /$d $d && mount -o remount,bind,ro $d; fi
done
if [ -n "$SB_PREFIX" ]; then mkdir -p ."$SB_PREFIX" && mount --rbind "$SB_PREFIX" ."$SB_PREFIX" && mount -o remount,bind,ro ."$SB_PREFIX"; fi
mount -t proc proc proc
for n in null zero full random urandom; do touch dev/$n && mount --bind /dev/$n dev/$n; done
mkdir dev/shm
mount -t tmpfs -o size="$SB_TMPFS" tmpfs dev/shm
mount -t tmpfs -o size="$SB_TMPFS" tmpfs tmp
mount -t tmpfs -o size="$SB_TMPFS" tmpfs sandbox
mount -o remount,bind,ro /tmp/root
exec chroot /tmp/root /usr/bin/env -C /sandbox /usr/bin/setpriv --bounding-set=-all --inh-caps=-all --no-new-privs -- "$@"
"""


class Sandbox:
    """Runs candidates, one sandboxed process tree per call; safe to call from many threads at once."""

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        *,
        backend: Backend = "auto",
        uid: int = 65534,
        gid: int = 65534,
        python: str | None = None,
        use_cgroup: bool = True,
    ) -> None:
        if backend not in ("auto", "bwrap", "unshare", "process"):
            raise ValueError(f"Sandbox backend must be auto, bwrap, unshare or process, got {backend!r}")
        self.limits = limits or SandboxLimits()
        self._root = os.geteuid() == 0
        if self._root and (uid == 0 or gid == 0):
            raise ValueError("Sandbox uid/gid must not be 0: root ignores RLIMIT_NPROC, a fork bomb would get through")
        self.uid, self.gid = (uid, gid) if self._root else (os.geteuid(), os.getegid())
        self.python = python or find_sandbox_python()
        self._cgroup = _PidsCgroup.find() if use_cgroup else None
        self._requested = backend
        self._backend: str | None = None
        self._info: SandboxInfo | None = None
        self._probe_lock = threading.Lock()

    # -- public API ------------------------------------------------------------------------------------------

    @property
    def info(self) -> SandboxInfo:
        """The isolation this sandbox gives; the first access probes the backends (raises if none works)."""
        self._ensure_backend()
        assert self._info is not None
        return self._info

    def run_tests(self, program: str, tests: Sequence[str], entry_point: str | None = None) -> SandboxResult:
        """Run ``program`` then each Python test (HumanEval style: ``check(entry_point)`` after each test)."""
        if isinstance(tests, str):
            tests = [tests]
        if not tests:
            raise ValueError("run_tests needs at least one test")
        job = {"mode": "tests", "program": program, "tests": list(tests), "entry_point": entry_point or ""}
        return self._execute(job, len(tests))

    def run_io(self, program: str, cases: Sequence[tuple[str, str]]) -> SandboxResult:
        """Run ``program`` once per ``(stdin, expected stdout)`` case; outputs are compared here, on the host."""
        if not cases:
            raise ValueError("run_io needs at least one case")
        job = {"mode": "io", "program": program, "inputs": [c[0] for c in cases]}
        result = self._execute(job, len(cases))
        if result.token_ok:
            result.passed = [
                ok and _same_output(out, expected)
                for ok, out, (_, expected) in zip(result.passed, result.outputs, cases, strict=True)
            ]
        return result

    # -- backends --------------------------------------------------------------------------------------------

    def _ensure_backend(self) -> str:
        if self._backend is not None:
            return self._backend
        with self._probe_lock:
            if self._backend is not None:
                return self._backend
            order = list(_ISOLATING_BACKENDS) if self._requested == "auto" else [self._requested]
            failures = []
            for backend in order:
                why = self._probe(backend)
                if why is None:
                    self._backend = backend
                    self._info = self._describe(backend)
                    if backend == "process":
                        logger.warning(
                            "sandbox backend 'process': no namespaces; candidates reach the network "
                            "and read the host filesystem as uid %d",
                            self.uid,
                        )
                    return backend
                failures.append(f"{backend}: {why}")
            raise SandboxUnavailableError(
                "no sandbox backend works here (" + "; ".join(failures) + "). Install bubblewrap "
                "(apt-get install -y bubblewrap) and allow unprivileged user namespaces "
                "(sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces>0), or choose "
                "Sandbox(backend='process') knowingly: it has no network or filesystem isolation"
            )

    def _probe(self, backend: str) -> str | None:
        tool = {"bwrap": "bwrap", "unshare": "unshare", "process": None}[backend]
        if tool and shutil.which(tool) is None:
            return f"{tool} is not installed"
        if shutil.which("setpriv") is None:
            return "setpriv (util-linux) is not installed: it drops root and ties the sandbox to its parent"
        try:
            result = self._execute(
                {"mode": "tests", "program": "import os\nx = 41", "tests": ["assert x + 1 == 42"], "entry_point": ""},
                1,
                backend=backend,
                probing=True,
            )
        except SandboxError as exc:
            return str(exc)
        if not result.all_passed:
            return f"probe run failed (exit {result.exit_code}): {result.output[-300:]!r}"
        return None

    def _describe(self, backend: str) -> SandboxInfo:
        cgroup = f"{self._cgroup.base} (cgroup v{self._cgroup.version})" if self._cgroup else None
        notes = []
        if not self._root:
            notes.append(
                "not started as root: candidates run as the invoking user (RLIMIT_NPROC counts per "
                "user namespace, so it still holds inside the sandbox)"
            )
        if cgroup is None:
            notes.append("no writable pids cgroup: the process limit is RLIMIT_NPROC alone")
        if backend == "bwrap":
            return SandboxInfo(
                backend,
                self.uid,
                self.gid,
                self.uid != 0,
                ("user", "pid", "net", "mount", "ipc", "uts", "cgroup"),
                "new tmpfs root: /usr (+/bin,/lib links) and the interpreter read-only; size-capped "
                f"tmpfs at {_WORKDIR}, /tmp, /dev/shm; nothing else of the host",
                "own namespace, loopback only",
                cgroup,
                self.python,
                tuple(notes),
            )
        if backend == "unshare":
            return SandboxInfo(
                backend,
                self.uid,
                self.gid,
                self.uid != 0,
                ("user", "pid", "net", "mount", "ipc", "uts"),
                "chroot into a tmpfs root: /usr (+/bin,/lib) and the interpreter read-only; "
                f"size-capped tmpfs at {_WORKDIR}, /tmp, /dev/shm; all capabilities dropped",
                "own namespace, loopback down",
                cgroup,
                self.python,
                tuple(notes),
            )
        notes.append(
            "backend 'process': host filesystem readable (and writable where the uid may), network "
            "reachable; leftover processes are found through the cgroup, else by uid (keep it dedicated)"
        )
        return SandboxInfo(
            backend,
            self.uid,
            self.gid,
            self.uid != 0,
            (),
            "host filesystem, private working folder",
            "host network (not isolated)",
            cgroup,
            self.python,
            tuple(notes),
        )

    def _command(self, backend: str, job_fd: int, res_fd: int, workdir: str | None) -> list[str]:
        python = [self.python, "-I", "-c", _HARNESS, str(job_fd), str(res_fd)]
        # setpriv drops root for the sandbox uid, and makes the sandbox die with the process that started it (a
        # reward worker killed on its own timeout leaves nothing running; bwrap/unshare keep the signal).
        identity = [f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups"] if self._root else []
        drop = ["setpriv", "--pdeathsig", "KILL", *identity, "--"]
        tmpfs = str(self.limits.tmpfs_bytes)
        if backend == "bwrap":
            prefix = _python_prefix(self.python)
            return drop + [
                "bwrap",
                "--unshare-all",
                "--unshare-user",
                "--disable-userns",
                "--die-with-parent",
                "--as-pid-1",
                "--hostname",
                "sandbox",
                "--clearenv",
                "--setenv",
                "PATH",
                "/usr/bin:/bin",
                "--setenv",
                "HOME",
                _WORKDIR,
                "--setenv",
                "LANG",
                "C.UTF-8",
                *_root_binds(),
                *(["--ro-bind", prefix, prefix] if prefix else []),
                "--proc",
                "/proc",
                "--dev",
                "/dev",
                "--size",
                tmpfs,
                "--tmpfs",
                "/dev/shm",
                "--size",
                tmpfs,
                "--tmpfs",
                "/tmp",
                "--size",
                tmpfs,
                "--perms",
                "0755",
                "--tmpfs",
                _WORKDIR,
                "--remount-ro",
                "/",
                "--chdir",
                _WORKDIR,
                "--",
                *python,
            ]
        if backend == "unshare":
            return drop + [
                "unshare",
                "--user",
                "--map-root-user",
                "--net",
                "--mount",
                "--pid",
                "--fork",
                "--kill-child",
                "--ipc",
                "--uts",
                "--",
                "/bin/sh",
                "-c",
                _UNSHARE_SETUP,
                "sandbox-setup",
                *python,
            ]
        assert workdir is not None
        return drop + ["env", "-C", workdir, *python]

    def _env(self, backend: str) -> dict[str, str]:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": _WORKDIR}
        if backend == "unshare":
            env.update(SB_TMPFS=str(self.limits.tmpfs_bytes), SB_PREFIX=_python_prefix(self.python) or "")
        return env

    # -- one run ---------------------------------------------------------------------------------------------

    def _execute(
        self, job: dict, n_results: int, *, backend: str | None = None, probing: bool = False
    ) -> SandboxResult:
        backend = backend or self._ensure_backend()
        limits = self.limits
        token = secrets.token_hex(16)
        job = dict(
            job,
            token=token,
            test_time_s=limits.per_test_s,
            case_output_bytes=limits.case_output_bytes,
            rlimits=[
                ["RLIMIT_CPU", int(limits.cpu_time_s)],
                ["RLIMIT_AS", int(limits.memory_bytes)],
                ["RLIMIT_FSIZE", int(limits.file_size_bytes)],
                ["RLIMIT_NOFILE", int(limits.open_files)],
                ["RLIMIT_NPROC", int(limits.processes)],
                ["RLIMIT_CORE", 0],
            ],
        )
        job_fd = os.memfd_create("posttrain-sandbox-job", os.MFD_CLOEXEC)
        res_r, res_w = os.pipe()
        workdir = cgroup = proc = None
        start = time.monotonic()
        try:
            payload = marshal.dumps(job, 4)  # host to harness only; results come back as JSON
            view = memoryview(payload)
            while view:
                view = view[os.write(job_fd, view) :]
            os.lseek(job_fd, 0, os.SEEK_SET)
            if backend == "process":
                workdir = self._make_workdir()
            command = self._command(backend, job_fd, res_w, workdir)
            if self._cgroup is not None:
                cgroup = self._cgroup.create(limits.processes + 8)  # + the wrapper, bwrap and its pid 1
                command = ["/bin/sh", "-c", 'echo 0 > "$0" && exec "$@"', str(cgroup / "cgroup.procs"), *command]
            try:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    pass_fds=(job_fd, res_w),
                    env=self._env(backend),
                    start_new_session=True,
                    cwd="/",
                )
            except OSError as exc:
                raise SandboxError(f"cannot start the {backend} sandbox: {exc}") from exc
            os.close(res_w)
            res_w = -1
            os.close(job_fd)
            job_fd = -1
            result, output, timed_out = self._collect(proc, res_r, start + limits.wall_time_s)
            if timed_out:
                self._kill(proc)
            exit_code = proc.wait()
        finally:
            for fd in (job_fd, res_w, res_r):
                if fd >= 0:
                    os.close(fd)
            if proc is not None and proc.poll() is None:
                self._kill(proc)
                proc.wait()
            if cgroup is not None:
                self._cgroup.kill_and_remove(cgroup)  # type: ignore[union-attr]
            if backend == "process":
                self._kill_uid_leftovers()
                if workdir is not None:
                    shutil.rmtree(workdir, ignore_errors=True)
        duration = time.monotonic() - start
        text = output.decode("utf-8", "replace")
        if not result.startswith(b"S"):
            if timed_out:  # killed before the harness wrote anything (e.g. a stuck start): a failed candidate
                return SandboxResult([False] * n_results, False, True, exit_code, text, duration)
            raise SandboxError(f"the {backend} sandbox did not start the harness (exit {exit_code}): {text[-500:]!r}")
        return self._parse(result[1:], token, job["mode"], n_results, timed_out, exit_code, text, duration, probing)

    def _parse(
        self,
        data: bytes,
        token: str,
        mode: str,
        n: int,
        timed_out: bool,
        exit_code: int | None,
        text: str,
        duration: float,
        probing: bool,
    ) -> SandboxResult:
        failed = SandboxResult([False] * n, False, timed_out, exit_code, text, duration)
        head = token.encode() + b"\n"
        if not data.startswith(head):
            return failed
        body = data[len(head) :]
        if mode == "tests":
            if len(body) != n or set(body) - {48, 49}:
                return failed
            return SandboxResult([b == 49 for b in body], True, timed_out, exit_code, text, duration)
        try:
            cases = json.loads(body)
        except ValueError:
            return failed
        if not isinstance(cases, list) or len(cases) != n:
            return failed
        passed = [code == 0 and not case_timeout and not too_long for code, case_timeout, too_long, _ in cases]
        return SandboxResult(passed, True, timed_out, exit_code, text, duration, [c[3] for c in cases])

    def _collect(self, proc: subprocess.Popen, res_r: int, deadline: float) -> tuple[bytes, bytes, bool]:
        """Read the result pipe and the (capped) output until both close, the sandbox's top process exits (a
        leftover of the ``process`` backend may hold the pipes open), or the deadline passes."""
        assert proc.stdout is not None
        out_fd = proc.stdout.fileno()
        caps = {res_r: 64 << 20, out_fd: self.limits.output_bytes}
        data: dict[int, bytearray] = {res_r: bytearray(), out_fd: bytearray()}
        timed_out = False
        with selectors.DefaultSelector() as sel:
            for fd in (res_r, out_fd):
                sel.register(fd, selectors.EVENT_READ)
            exited = False
            while sel.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                ready = sel.select(0 if exited else min(remaining, 0.05))
                if exited and not ready:
                    break  # the top process is gone and its pipes are drained
                for key, _ in ready:
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fd)
                        continue
                    room = caps[key.fd] - len(data[key.fd])
                    if room > 0:
                        data[key.fd] += chunk[:room]
                exited = exited or proc.poll() is not None
        proc.stdout.close()
        return bytes(data[res_r]), bytes(data[out_fd]), timed_out

    def _kill(self, proc: subprocess.Popen) -> None:
        """Kill the sandbox: first the PID namespace's init (its death kills every process in the namespace),
        so that bwrap/unshare reap it and exit on their own, leaving no zombie to the host's init; then the
        whole process group."""
        for child in _children_of(proc.pid):
            try:
                os.kill(child, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _make_workdir(self) -> str:
        import tempfile

        path = tempfile.mkdtemp(prefix="posttrain-sandbox-")
        os.chmod(path, 0o700)
        if self._root:
            os.chown(path, self.uid, self.gid)
        return path

    def _kill_uid_leftovers(self) -> None:
        """``process`` backend without a PID namespace: kill what the candidate left running under its uid, and
        wait (up to 2 s) until none of it runs any more (a zombie waiting for the host's init does not run)."""
        if not self._root or self._cgroup is not None:
            return
        deadline = time.monotonic() + 2.0
        while True:
            alive = [pid for pid, state in _processes_of_uid(self.uid) if state != "Z"]
            if not alive or time.monotonic() > deadline:
                return
            for pid in alive:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)


def _processes_of_uid(uid: int) -> list[tuple[int, str]]:
    """(pid, state letter) of every process whose real uid is ``uid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            found.append((int(entry.name), fields.get("State", "?").split()[0]))
    return found


def _children_of(pid: int) -> list[int]:
    """Host pids whose parent is ``pid`` (read from /proc/*/stat; /proc/PID/task/*/children may be absent)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat_line.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            children.append(int(entry.name))
    return children


def _normalise_output(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _same_output(actual: str, expected: str) -> bool:
    """stdin/stdout comparison: equal line by line, ignoring trailing whitespace and trailing blank lines."""
    return _normalise_output(actual) == _normalise_output(expected)


_DEFAULT: dict[tuple, Sandbox] = {}
_DEFAULT_LOCK = threading.Lock()


def default_sandbox(limits: SandboxLimits | None = None, backend: Backend = "auto") -> Sandbox:
    """One shared :class:`Sandbox` per (limits, backend) in this process, so the backend is probed once."""
    key = (limits or SandboxLimits(), backend)
    with _DEFAULT_LOCK:
        if key not in _DEFAULT:
            _DEFAULT[key] = Sandbox(key[0], backend=backend)
        return _DEFAULT[key]
