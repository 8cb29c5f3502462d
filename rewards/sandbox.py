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

Python tests run in two sandboxes side by side (:mod:`posttrain.rewards.code_harness` is the program in both):
the candidate's program in a fresh one per run, which answers calls to its functions; the tests in a fresh
process forked per run by a long-lived test server in the other (:class:`_TestServer`), under another uid, in
other PID, mount and user namespaces, not dumpable (no ptrace, no ``/proc/PID/mem``), with no writable mount in
common. The two talk over a pair of pipes that carry plain data only (None, bool, int, float, str,
bytes and containers of them, exact types); names the tests use besides the function under test come from a
trusted ``prelude`` (a HumanEval prompt) run in the test process. Only the test process holds the result pipe
and the token: it writes ``S`` on start, then the token and one byte per test. So stack walking, objects whose
``__eq__`` is always true, patched modules, redefined helpers, rewritten results, ``exit(0)``, ``SystemExit``,
a crash or printing "all tests passed" cannot produce a pass. stdin/stdout cases run in one sandbox: each case
is a child of a non-dumpable harness, the program is a sealed memfd that no case can change, and the expected
outputs never enter the sandbox (the host compares).

Started as root, every candidate's sandbox (and each test server) takes a host uid of its own from a pool
(``uid``, ``uid + 1``, ...; held with a lock file so that sandboxes in other processes never take the same one): Linux does not enforce ``RLIMIT_NPROC``
for root, and counts it over every process of a uid. The harness sets the rlimits of :class:`SandboxLimits`
(CPU time, address space, file size, open files, processes) before any candidate code runs. Where a writable
cgroup exists (v2, or the v1 ``pids`` and ``memory`` hierarchies) each run's candidate also gets its own
``pids.max`` and ``memory.max`` (v1: ``memory.limit_in_bytes``) over all of its processes together; without a
memory cgroup each process's address space is limited to ``memory_bytes / processes``, so the processes the
candidate may have cannot together exceed ``memory_bytes``. ``Sandbox().info.memory_bound`` says which holds.
On the wall-clock timeout, and once the verdict is in, the process groups, the cgroups and, through the PID
namespaces, every process the candidate started are killed; nothing is left behind. The sandbox also dies with
the process that started it (``setpriv --pdeathsig``), so a reward worker killed on its own time limit leaves
nothing running.

This module must never run candidate code outside the sandbox, nor write anywhere on the host except its own
cgroup folders, its uid lock files (``/run/posttrain-sandbox``, else the temporary folder) and, for the
``process`` backend only, private working folders it removes.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib.util
import itertools
import logging
import marshal
import os
import secrets
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from posttrain.rewards import code_harness

logger = logging.getLogger(__name__)

Backend = Literal["auto", "bwrap", "unshare", "process"]
_ISOLATING_BACKENDS: tuple[str, ...] = ("bwrap", "unshare")
_WORKDIR = "/sandbox"  # the candidate's working folder inside the namespaced backends
_HARNESS_SOURCE = Path(code_harness.__file__).read_text(encoding="utf-8")
DEFAULT_FIRST_UID = 1_600_000_000
"""First host uid of the default pool: a block no account uses (each running sandbox takes two)."""


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
    """Memory of all the candidate's processes together: a memory cgroup's limit where one is writable, else
    RLIMIT_AS of ``memory_bytes / processes`` per process (see ``Sandbox().info.memory_bound``)."""
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
    memory_cgroup: str | None = None
    """The cgroup folder under which each run gets its own memory limit, or None where none is writable."""
    memory_bound: str = ""
    """Which bound holds the memory of all the candidate's processes together, in words."""
    uid_range: tuple[int, int] | None = None
    """First and last host uid of the pool runs take theirs from (two per running sandbox: the candidate's and the
    tests'); None when not started as root (everything runs as the invoking user)."""


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


_CONTROL_FILES = {("pids", 2): "pids.max", ("pids", 1): "pids.max", ("memory", 2): "memory.max"}
_CONTROL_FILES[("memory", 1)] = "memory.limit_in_bytes"


class _RunCgroups:
    """Writable cgroup folders (v2, or the v1 ``pids`` and ``memory`` hierarchies) under which each run's candidate
    gets its own child folders: ``pids.max`` and a memory limit over all of its processes together."""

    def __init__(self, bases: dict[str, tuple[Path, int]]) -> None:
        self.bases = bases
        """controller ("pids", "memory") -> (parent folder, cgroup version); v2 controllers share one folder."""
        self._counter = 0
        self._lock = threading.Lock()

    @staticmethod
    def find() -> _RunCgroups | None:
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
        candidates: dict[str, list[tuple[Path, int]]] = {"pids": [], "memory": []}
        for line in mounts:
            pre, _, post = line.partition(" - ")
            fields, post_fields = pre.split(), post.split()
            if len(post_fields) < 3 or len(fields) < 5:
                continue
            fstype, root, mount_point, options = post_fields[0], fields[3], fields[4], post_fields[2]
            for controller, found in candidates.items():
                if fstype == "cgroup2" and "v2" in paths:
                    own_path = paths["v2"]
                elif fstype == "cgroup" and controller in options.split(","):
                    key = next((k for k in paths if controller in k.split(",")), None)
                    if key is None:
                        continue
                    own_path = paths[key]
                else:
                    continue
                if root != "/" and not own_path.startswith(root):
                    continue  # our cgroup is not visible through this mount
                relative = own_path[len(root) :] if root != "/" else own_path
                found.append((Path(mount_point) / relative.lstrip("/"), 2 if fstype == "cgroup2" else 1))
        bases: dict[str, tuple[Path, int]] = {}
        for controller, places in candidates.items():
            for own_dir, version in places:
                base = _usable_base(own_dir, version, controller)
                if base is not None:
                    bases[controller] = (base, version)
                    break
        return _RunCgroups(bases) if bases else None

    def folder(self, controller: str) -> str | None:
        if controller not in self.bases:
            return None
        base, version = self.bases[controller]
        return f"{base} (cgroup v{version})"

    def create(self, max_pids: int, memory_bytes: int) -> list[Path]:
        """The run's folders (one per hierarchy), their limits written; join by writing to their cgroup.procs."""
        with self._lock:
            self._counter += 1
            name = f"run-{self._counter}-{secrets.token_hex(4)}"
        made: dict[Path, Path] = {}
        try:
            for controller, (base, version) in self.bases.items():
                path = made.get(base)
                if path is None:
                    path = made[base] = base / name
                    path.mkdir()
                if controller == "pids":
                    (path / "pids.max").write_text(str(max_pids))
                else:
                    (path / _CONTROL_FILES[("memory", version)]).write_text(str(memory_bytes))
                    swap = path / ("memory.swap.max" if version == 2 else "memory.memsw.limit_in_bytes")
                    if swap.exists():  # no swapping around the limit
                        with contextlib.suppress(OSError):
                            swap.write_text("0" if version == 2 else str(memory_bytes))
        except OSError:
            self.kill_and_remove(list(made.values()))
            raise
        return list(made.values())

    def kill_and_remove(self, paths: list[Path]) -> None:
        for path in paths:
            _kill_and_remove_cgroup(path)


def _usable_base(own_dir: Path, version: int, controller: str) -> Path | None:
    """Our folder for runs under ``own_dir``, when a child there gets the controller's limit file; else None."""
    _remove_stale_bases(own_dir)
    base = own_dir / f"posttrain-sandbox-{os.getpid()}"
    if version == 2:  # children see a controller only if every level enables it; works where the level is empty
        with contextlib.suppress(OSError):
            (own_dir / "cgroup.subtree_control").write_text(f"+{controller}")
    try:
        base.mkdir(exist_ok=True)
        if version == 2:
            (base / "cgroup.subtree_control").write_text(f"+{controller}")
        probe = base / "probe"
        probe.mkdir(exist_ok=True)
        ok = (probe / _CONTROL_FILES[(controller, version)]).exists()
        probe.rmdir()
        if ok:
            atexit.register(_remove_quietly, base)
            return base
        if not any(base.iterdir()) or version == 1:
            _remove_quietly(base)
    except OSError:
        _remove_quietly(base)
    return None


def _kill_and_remove_cgroup(path: Path) -> None:
    """Kill every process left in a run's cgroup, wait until it is empty, and remove it."""
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
        time.sleep(0.002)


class UidPool:
    """Host uids for the sandboxes that run at once: each candidate's sandbox (and each test server) holds one for
    its whole life, with an exclusive ``flock`` on a lock file per uid, so that no other, in this process or another
    (reward workers each have their own :class:`Sandbox`), takes it meanwhile. RLIMIT_NPROC counts every process
    of a uid: with a uid of its own, a candidate's process limit, and so its memory bound, is its alone."""

    def __init__(self, first: int, count: int) -> None:
        if first <= 0 or count < 2 or first + count > 2**32 - 2:
            raise ValueError(f"Sandbox uid pool {first}..{first + count - 1} is not a valid range of non-root uids")
        self.first, self.count = first, count
        self._next = 0
        self._lock = threading.Lock()
        self._dir = _lock_folder()

    @property
    def uids(self) -> tuple[int, ...]:
        return tuple(range(self.first, self.first + self.count))

    @contextlib.contextmanager
    def lease(self, wait_s: float = 30.0) -> Iterator[int]:
        """A uid no other sandbox holds, for as long as the ``with`` block runs."""
        deadline = time.monotonic() + wait_s
        while True:
            with self._lock:
                start = self._next
                self._next = (self._next + 1) % self.count
            for i in range(self.count):
                uid = self.first + (start + i) % self.count
                fd = os.open(self._dir / f"uid-{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                try:
                    yield uid
                finally:
                    os.close(fd)  # releases the lock
                return
            if time.monotonic() > deadline:
                raise SandboxError(f"all {self.count} sandbox uids from {self.first} stayed busy for {wait_s} s")
            time.sleep(0.01)


class _TestServer:
    """The long-lived sandbox in which each run's tests run: a ``tests-server`` harness (see
    :mod:`~posttrain.rewards.code_harness`) forks one fresh, non-dumpable test process per run and hands it that
    run's descriptors, which the server then closes. Its own uid, PID, user and mount namespaces: nothing it
    shares with any candidate. It ends when its control socket closes (this process ended, or :meth:`close`)."""

    def __init__(self, sandbox: Sandbox, backend: str) -> None:
        self._sandbox, self._backend = weakref.ref(sandbox), backend  # the sandbox's finalizer closes this
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._control: socket.socket | None = None
        self._held = contextlib.ExitStack()
        self.uid: int | None = None

    def start_run(self, run_id: int, job: dict, fds: Sequence[int]) -> None:
        """Start the test process of run ``run_id`` with ``fds``: output, result, requests, replies."""
        job_fd = _job_memfd("posttrain-tests", job)
        try:
            message = marshal.dumps(["run", run_id])
            for attempt in (1, 2):
                control = self._ensure_started(restart=attempt == 2)
                try:
                    socket.send_fds(control, [message], [job_fd, *fds])
                    return
                except OSError as exc:  # the server died (killed, out of memory): start another, once
                    if attempt == 2:
                        raise SandboxError(f"the {self._backend} test server does not take runs: {exc}") from exc
        finally:
            os.close(job_fd)

    def kill_run(self, run_id: int) -> None:
        with self._lock:
            control = self._control
        if control is not None:
            with contextlib.suppress(OSError):
                control.send(marshal.dumps(["kill", run_id]))

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        if self._control is not None:
            self._control.close()  # the server reads end of file and exits, its namespace with it
            self._control = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                _kill_tree(self._proc)
            self._proc = None
        self._held.close()

    def _ensure_started(self, restart: bool) -> socket.socket:
        with self._lock:
            if self._control is not None and not restart and self._proc is not None and self._proc.poll() is None:
                return self._control
            self._stop()
            sandbox = self._sandbox()
            if sandbox is None:
                raise SandboxError("the sandbox of this test server is gone")
            if sandbox._uids is not None:
                self.uid = self._held.enter_context(sandbox._uids.lease())
            else:
                self.uid = sandbox.uid
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            job_fd = _job_memfd(
                "posttrain-tests-server",
                {
                    "harness": sandbox._harness(),
                    "rlimits": [
                        ["RLIMIT_NOFILE", 256],
                        ["RLIMIT_NPROC", 4096],
                        ["RLIMIT_CORE", 0],
                    ],
                },
            )
            err_r, err_w = os.pipe()
            try:
                workdir = None
                if self._backend == "process":
                    workdir = sandbox._make_workdir(self.uid)
                    self._held.callback(shutil.rmtree, workdir, ignore_errors=True)
                command = sandbox._command(
                    self._backend, "tests-server", [job_fd, theirs.fileno()], self.uid, workdir, die_with_parent=False
                )
                self._proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err_w,
                    pass_fds=(job_fd, theirs.fileno()),
                    env=sandbox._env(self._backend),
                    start_new_session=True,
                    cwd="/",
                )
            except OSError as exc:
                os.close(err_r)
                raise SandboxError(f"cannot start the {self._backend} test server: {exc}") from exc
            finally:
                os.close(job_fd)
                os.close(err_w)
                theirs.close()
            ours.settimeout(30.0)
            try:
                ready = ours.recv(16)
            except OSError:
                ready = b""
            ours.settimeout(None)
            if ready != b"ready":
                with os.fdopen(err_r, "rb") as err:
                    why = err.read(4000).decode(errors="replace") if self._proc.poll() is not None else ""
                ours.close()
                _kill_tree(self._proc)
                raise SandboxError(f"the {self._backend} test server did not start: {why[-500:]!r}")
            os.close(err_r)  # later writes of the server to stderr fail; it writes none
            self._control = ours
            return ours


def _close_servers(servers: dict[str, _TestServer]) -> None:
    for server in list(servers.values()):
        server.close()


def _job_memfd(name: str, job: dict) -> int:
    """A memfd holding ``job`` as marshal data, positioned at its start (host to harness only)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        code_harness.write_all(fd, marshal.dumps(job, 4))
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lock_folder() -> Path:
    for parent in (Path("/run"), Path(tempfile.gettempdir())):
        folder = parent / "posttrain-sandbox"
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            if folder.is_symlink() or folder.stat().st_uid != os.geteuid():
                continue
            return folder
        except OSError:
            continue
    raise SandboxError("no folder for the sandbox's uid lock files (tried /run and the temporary folder)")


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
        uid: int = DEFAULT_FIRST_UID,
        gid: int = 65534,
        python: str | None = None,
        use_cgroup: bool = True,
        uid_count: int = 128,
    ) -> None:
        """``uid``: the first host uid of this sandbox's pool of ``uid_count`` (each running sandbox holds two:
        the candidate's and the tests'); ``gid`` is every run's group. Used only when started as root (else
        everything runs as the invoking user). ``use_cgroup=False`` skips the pids and memory cgroups."""
        if backend not in ("auto", "bwrap", "unshare", "process"):
            raise ValueError(f"Sandbox backend must be auto, bwrap, unshare or process, got {backend!r}")
        self.limits = limits or SandboxLimits()
        self._root = os.geteuid() == 0
        if self._root and (uid == 0 or gid == 0):
            raise ValueError("Sandbox uid/gid must not be 0: root ignores RLIMIT_NPROC, a fork bomb would get through")
        self.uid, self.gid = (uid, gid) if self._root else (os.geteuid(), os.getegid())
        self._uids = UidPool(uid, uid_count) if self._root else None
        self.python = python or find_sandbox_python()
        self._cgroup = _RunCgroups.find() if use_cgroup else None
        self._requested = backend
        self._backend: str | None = None
        self._info: SandboxInfo | None = None
        self._probe_lock = threading.Lock()
        self._harness_code: object = None
        self._servers: dict[str, _TestServer] = {}
        self._servers_lock = threading.Lock()
        weakref.finalize(self, _close_servers, self._servers)  # a sandbox no longer used ends its test servers
        self._run_ids = itertools.count(1)

    # -- public API ------------------------------------------------------------------------------------------

    @property
    def info(self) -> SandboxInfo:
        """The isolation this sandbox gives; the first access probes the backends (raises if none works)."""
        self._ensure_backend()
        assert self._info is not None
        return self._info

    @property
    def uids(self) -> tuple[int, ...]:
        """Every host uid a run of this sandbox may take."""
        return self._uids.uids if self._uids is not None else (self.uid,)

    @property
    def test_server_uids(self) -> tuple[int, ...]:
        """The uids of the running test servers (long-lived by design: every other uid is free between runs)."""
        with self._servers_lock:
            return tuple(s.uid for s in self._servers.values() if s.uid is not None and s.running)

    def run_tests(
        self, program: str, tests: Sequence[str], entry_point: str | None = None, *, prelude: str | None = None
    ) -> SandboxResult:
        """Run ``program`` in one sandbox and each Python test in another.

        With ``entry_point``, each test defines ``check(candidate)`` and is called as ``check(<entry_point>)``
        (HumanEval's convention), the argument being a stand-in that calls the candidate's function across the
        process boundary. Without it, a test passes when it runs to the end, and a name it reads that neither it,
        the prelude nor the builtins define is fetched from the candidate (plain data as a copy, a function as a
        stand-in). ``prelude`` is trusted code (a HumanEval prompt: imports, helpers such as ``poly``) run in the
        test process before the tests when they use a name it defines; those names never come from the candidate.
        """
        if isinstance(tests, str):
            tests = [tests]
        if not tests:
            raise ValueError("run_tests needs at least one test")
        if not all(isinstance(t, str) for t in tests):
            raise ValueError("run_tests: every test must be a string of Python code")
        job = {
            "mode": "tests",
            "program": program,
            "tests": list(tests),
            "entry_point": entry_point or "",
            "prelude": prelude or "",
        }
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
                            "and read the host filesystem as uids %d-%d",
                            self.uids[0],
                            self.uids[-1],
                        )
                    return backend
                failures.append(f"{backend}: {why}")
                with self._servers_lock:
                    failed = self._servers.pop(backend, None)
                if failed is not None:
                    failed.close()
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
        probe = {
            "mode": "tests",
            "program": "x = 41",
            "tests": ["assert x + 1 == 42"],
            "entry_point": "",
            "prelude": "",
        }
        try:
            result = self._execute(probe, 1, backend=backend)
        except SandboxError as exc:
            return str(exc)
        if not result.all_passed:
            return f"probe run failed (exit {result.exit_code}): {result.output[-300:]!r}"
        return None

    def _memory_bound(self) -> tuple[str | None, str]:
        limits = self.limits
        memory_cgroup = self._cgroup.folder("memory") if self._cgroup else None
        if memory_cgroup is not None:
            return memory_cgroup, (
                f"cgroup: {limits.memory_bytes} bytes for all of a candidate's processes together (each run its "
                f"own cgroup under {memory_cgroup}); RLIMIT_AS {limits.memory_bytes} per process"
            )
        per_process = limits.memory_bytes // limits.processes
        return None, (
            f"rlimits: RLIMIT_AS {per_process} bytes per process x RLIMIT_NPROC {limits.processes} processes "
            f"<= {limits.memory_bytes} bytes (no writable memory cgroup; "
            + ("each running sandbox has uids of its own)" if self._root else "the invoking user's processes count)")
        )

    def _describe(self, backend: str) -> SandboxInfo:
        pids_cgroup = self._cgroup.folder("pids") if self._cgroup else None
        memory_cgroup, memory_bound = self._memory_bound()
        notes = []
        if not self._root:
            notes.append(
                "not started as root: candidates and tests run as the invoking user (RLIMIT_NPROC counts per "
                "user namespace, so it still holds inside the sandbox)"
            )
        if pids_cgroup is None:
            notes.append("no writable pids cgroup: the process limit is RLIMIT_NPROC alone")
        common = {
            "backend": backend,
            "uid": self.uid,
            "gid": self.gid,
            "unprivileged": self.uid != 0,
            "pids_cgroup": pids_cgroup,
            "python": self.python,
            "memory_cgroup": memory_cgroup,
            "memory_bound": memory_bound,
            "uid_range": (self.uids[0], self.uids[-1]) if self._uids is not None else None,
        }
        if backend == "bwrap":
            return SandboxInfo(
                namespaces=("user", "pid", "net", "mount", "ipc", "uts", "cgroup"),
                filesystem=("new tmpfs root: /usr (+/bin,/lib links) and the interpreter read-only; size-capped "
                            f"tmpfs at {_WORKDIR}, /tmp, /dev/shm; nothing else of the host"),
                network="own namespace, loopback only",
                notes=tuple(notes),
                **common,
            )
        if backend == "unshare":
            return SandboxInfo(
                namespaces=("user", "pid", "net", "mount", "ipc", "uts"),
                filesystem=("chroot into a tmpfs root: /usr (+/bin,/lib) and the interpreter read-only; "
                            f"size-capped tmpfs at {_WORKDIR}, /tmp, /dev/shm; all capabilities dropped"),
                network="own namespace, loopback down",
                notes=tuple(notes),
                **common,
            )
        notes.append(
            "backend 'process': host filesystem readable (and writable where the uid may, /tmp included, which "
            "candidate and tests share), network reachable; candidate and tests are kept apart by their uids "
            "alone; leftover processes are found through the cgroup, else by uid (keep the pool dedicated)"
        )
        return SandboxInfo(
            namespaces=(),
            filesystem="host filesystem, private working folder",
            network="host network (not isolated)",
            notes=tuple(notes),
            **common,
        )

    def _command(
        self,
        backend: str,
        role: str,
        fds: Sequence[int],
        uid: int,
        workdir: str | None,
        *,
        die_with_parent: bool = True,
    ) -> list[str]:
        # The candidate's program and the tests see a plain `python -I` (site's exit(), quit() and the system's
        # packages included); the stdin/stdout runner skips `site` to start faster (each case is a `python -I`).
        flags = ["-I", "-S"] if role == "io" else ["-I"]
        python = [self.python, *flags, "-c", code_harness.BOOTSTRAP, role, *map(str, fds)]
        # setpriv drops root for the run's uid, and makes the sandbox die with the process that started it (a
        # reward worker killed on its own timeout leaves nothing running; bwrap/unshare keep the signal).
        identity = [f"--reuid={uid}", f"--regid={self.gid}", "--clear-groups"] if self._root else []
        # The test server outlives the thread that starts it (setpriv's signal follows a thread, not a process):
        # it ends when its control socket closes instead.
        drop = ["setpriv", *(["--pdeathsig", "KILL"] if die_with_parent else []), *identity, "--"]
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

    def _harness(self) -> object:
        """The harness for the job: compiled here when the sandbox's interpreter reads this one's bytecode."""
        if self._harness_code is None:
            query = "import sys; print(sys.modules['_frozen_importlib_external'].MAGIC_NUMBER.hex())"
            try:
                magic = subprocess.run(
                    [self.python, "-I", "-S", "-c", query], capture_output=True, text=True, check=False, timeout=30
                ).stdout.strip()
            except (OSError, subprocess.SubprocessError):  # no such interpreter: starting the sandbox will say so
                magic = ""
            same = magic == importlib.util.MAGIC_NUMBER.hex()
            self._harness_code = compile(_HARNESS_SOURCE, "code_harness.py", "exec") if same else _HARNESS_SOURCE
        return self._harness_code

    def _env(self, backend: str) -> dict[str, str]:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": _WORKDIR}
        if backend == "unshare":
            env.update(SB_TMPFS=str(self.limits.tmpfs_bytes), SB_PREFIX=_python_prefix(self.python) or "")
        return env

    def _rlimits(self, candidate: bool, memory_cgroup: bool) -> list[list]:
        limits = self.limits
        memory = limits.memory_bytes if memory_cgroup or not candidate else limits.memory_bytes // limits.processes
        return [
            ["RLIMIT_CPU", int(limits.cpu_time_s)],
            ["RLIMIT_AS", int(memory)],
            ["RLIMIT_FSIZE", int(limits.file_size_bytes)],
            ["RLIMIT_NOFILE", int(limits.open_files)],
            ["RLIMIT_NPROC", int(limits.processes)],
            ["RLIMIT_CORE", 0],
        ]

    # -- one run ---------------------------------------------------------------------------------------------

    def _execute(self, job: dict, n_results: int, *, backend: str | None = None) -> SandboxResult:
        backend = backend or self._ensure_backend()
        lease = self._uids.lease() if self._uids is not None else contextlib.nullcontext(self.uid)
        with lease as uid, contextlib.ExitStack() as cleanup:
            return self._execute_as(job, n_results, backend, uid, cleanup)

    def _spawn(
        self,
        backend: str,
        role: str,
        job: dict,
        fds: Sequence[int],
        uid: int,
        stdout: int,
        cgroups: list[Path],
        cleanup: contextlib.ExitStack,
    ) -> subprocess.Popen:
        """Start one sandboxed process tree running the harness in ``role``; ``fds`` after the job's are passed."""
        job_fd = _job_memfd(f"posttrain-sandbox-{role}", {**job, "harness": self._harness()})
        try:
            workdir = None
            if backend == "process":
                workdir = self._make_workdir(uid)
                cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
            command = self._command(backend, role, [job_fd, *fds], uid, workdir)
            if cgroups:
                join = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo 0 > "$1" || exit 125; shift; n=$((n-1)); done; exec "$@"'
                command = (
                    ["/bin/sh", "-c", join, "join", str(len(cgroups))]
                    + [str(c / "cgroup.procs") for c in cgroups]
                    + command
                )
            try:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stdout,
                    pass_fds=(job_fd, *fds),
                    env=self._env(backend),
                    start_new_session=True,
                    cwd="/",
                )
            except OSError as exc:
                raise SandboxError(f"cannot start the {backend} sandbox: {exc}") from exc
        finally:
            os.close(job_fd)
        cleanup.callback(self._end, proc)
        return proc

    def _test_server(self, backend: str) -> _TestServer:
        with self._servers_lock:
            server = self._servers.get(backend)
            if server is None:
                server = self._servers[backend] = _TestServer(self, backend)
            return server

    def close(self) -> None:
        """End the test servers (they also end with this process, or when this sandbox is garbage-collected); a
        later run starts them again."""
        _close_servers(self._servers)

    def _execute_as(
        self, job: dict, n_results: int, backend: str, uid: int, cleanup: contextlib.ExitStack
    ) -> SandboxResult:
        limits = self.limits
        token = secrets.token_hex(16)
        start = time.monotonic()
        memory_cgroup = self._cgroup is not None and "memory" in self._cgroup.bases
        cgroups: list[Path] = []
        if self._cgroup is not None:
            cgroups = self._cgroup.create(limits.processes + 8, limits.memory_bytes)  # + the wrapper, bwrap...
            cleanup.callback(self._cgroup.kill_and_remove, cgroups)
        if backend == "process":
            cleanup.callback(self._kill_uid_leftovers, [uid])
        base = {"test_time_s": limits.per_test_s, "case_output_bytes": limits.case_output_bytes}
        own: list[int] = []  # the host's ends, closed once the sandboxes hold theirs
        server, run_id = None, next(self._run_ids)
        try:
            res_r, res_w = os.pipe()
            own += [res_r, res_w]
            out_r, out_w = os.pipe()
            own += [out_r, out_w]
            if job["mode"] == "tests":
                req_r, req_w = os.pipe()
                own += [req_r, req_w]
                rep_r, rep_w = os.pipe()
                own += [rep_r, rep_w]
                candidate_job = {**base, "program": job["program"], "rlimits": self._rlimits(True, memory_cgroup)}
                main = self._spawn(backend, "candidate", candidate_job, [req_r, rep_w], uid, out_w, cgroups, cleanup)
                tests_job = {**base, **job, "token": token, "rlimits": self._rlimits(False, memory_cgroup)}
                del tests_job["program"]
                server = self._test_server(backend)
                server.start_run(run_id, tests_job, [out_w, res_w, req_w, rep_r])
                cleanup.callback(server.kill_run, run_id)  # a no-op once it ended
                reporter = None  # the test process: it closes the result pipe when it ends
            else:
                io_job = {**base, **job, "token": token, "rlimits": self._rlimits(True, memory_cgroup)}
                main = reporter = self._spawn(backend, "io", io_job, [res_w], uid, out_w, cgroups, cleanup)
            for fd in own:
                if fd not in (res_r, out_r):
                    os.close(fd)
            own = [res_r, out_r]
            result, output, timed_out = self._collect(reporter, res_r, out_r, start + limits.wall_time_s)
            # The verdict is in, or the time is up. The candidate's server ends by itself once the tests' end of
            # its pipes closes (unless stuck in a call): killing its namespace's init from inside the process
            # tree first lets bwrap/unshare reap it, where killing the whole group at once would leave a zombie
            # to the host's init.
            try:
                exit_code = main.wait(timeout=0 if timed_out else 2.0 if reporter else 0.1)
            except subprocess.TimeoutExpired:
                _kill_tree(main)
                exit_code = main.wait()
        finally:
            for fd in own:
                os.close(fd)
        duration = time.monotonic() - start
        text = output.decode("utf-8", "replace")
        if not result.startswith(b"S"):
            if timed_out:  # killed before the harness wrote anything (e.g. a stuck start): a failed candidate
                return SandboxResult([False] * n_results, False, True, exit_code, text, duration)
            raise SandboxError(f"the {backend} sandbox did not start the harness (exit {exit_code}): {text[-500:]!r}")
        return self._parse(result[1:], token, job["mode"], n_results, timed_out, exit_code, text, duration, backend)

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
        backend: str,
    ) -> SandboxResult:
        failed = SandboxResult([False] * n, False, timed_out, exit_code, text, duration)
        head = token.encode() + b"\n"
        if not data.startswith(head):
            return failed
        body = data[len(head) :]
        if mode == "tests":
            if body.startswith(b"X"):  # the candidate's sandbox never started: nothing was judged
                raise SandboxError(
                    f"the candidate's {backend} sandbox did not start: {body[1:].decode(errors='replace')}; "
                    f"output: {text[-500:]!r}"
                )
            if len(body) != n or set(body) - {48, 49}:
                return failed
            return SandboxResult([b == 49 for b in body], True, timed_out, exit_code, text, duration)
        try:
            cases = code_harness.decode(body)
        except code_harness.MalformedMessage:
            return failed
        if type(cases) is not list or len(cases) != n:
            return failed
        passed = [code == 0 and not case_timeout and not too_long for code, case_timeout, too_long, _ in cases]
        return SandboxResult(passed, True, timed_out, exit_code, text, duration, [c[3] for c in cases])

    def _collect(
        self, reporter: subprocess.Popen | None, res_r: int, out_r: int, deadline: float
    ) -> tuple[bytes, bytes, bool]:
        """Read the result pipe and the (capped) output until the result pipe closes (only the harness that
        reports holds it), that harness's sandbox (``reporter``, where it is one) exits with nothing left to
        read, or the deadline passes."""
        caps = {res_r: 64 << 20, out_r: self.limits.output_bytes}
        data: dict[int, bytearray] = {res_r: bytearray(), out_r: bytearray()}
        timed_out = False
        with selectors.DefaultSelector() as sel:
            for fd in (res_r, out_r):
                sel.register(fd, selectors.EVENT_READ)
            while res_r in sel.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                exited = reporter is not None and reporter.poll() is not None
                ready = sel.select(0 if exited else min(remaining, 0.05))
                if exited and not ready:
                    break
                for key, _ in ready:
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fd)
                        continue
                    room = caps[key.fd] - len(data[key.fd])
                    if room > 0:
                        data[key.fd] += chunk[:room]
            if out_r in sel.get_map():  # what was written before the verdict; a candidate still printing is cut
                while len(data[out_r]) < caps[out_r] and sel.select(0):
                    chunk = os.read(out_r, 1 << 16)
                    if not chunk:
                        break
                    data[out_r] += chunk[: caps[out_r] - len(data[out_r])]
        return bytes(data[res_r]), bytes(data[out_r]), timed_out

    def _end(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            _kill_tree(proc)
            proc.wait()

    def _make_workdir(self, uid: int) -> str:
        path = tempfile.mkdtemp(prefix="posttrain-sandbox-")
        os.chmod(path, 0o700)
        if self._root:
            os.chown(path, uid, self.gid)
        return path

    def _kill_uid_leftovers(self, uids: Sequence[int]) -> None:
        """``process`` backend without a PID namespace: kill what the run left running under its uids, and
        wait (up to 2 s) until none of it runs any more (a zombie waiting for the host's init does not run)."""
        if not self._root or self._cgroup is not None:
            return
        deadline = time.monotonic() + 2.0
        while True:
            alive = [pid for uid in set(uids) for pid, state in _processes_of_uid(uid) if state != "Z"]
            if not alive or time.monotonic() > deadline:
                return
            for pid in alive:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill one sandbox: first the PID namespace's init (its death kills every process in the namespace),
    so that bwrap/unshare reap it and exit on their own, leaving no zombie to the host's init; then the
    whole process group."""
    if proc.poll() is not None:
        return
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
    proc.wait()


def _proc_files(name: str) -> Iterator[tuple[int, str]]:
    """(pid, text of /proc/PID/``name``) of every process whose file could be read (a process may end meanwhile)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / name).read_text()
        except OSError:
            continue
        yield int(entry.name), text


def _processes_of_uid(uid: int) -> list[tuple[int, str]]:
    """(pid, state letter) of every process whose real uid is ``uid``."""
    found = []
    for pid, status in _proc_files("status"):
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            found.append((pid, fields.get("State", "?").split()[0]))
    return found


def _children_of(pid: int) -> list[int]:
    """Host pids whose parent is ``pid`` (read from /proc/*/stat; /proc/PID/task/*/children may be absent)."""
    children = []
    for child, stat_line in _proc_files("stat"):
        fields = stat_line.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            children.append(child)
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
