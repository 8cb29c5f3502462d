"""The code sandbox: hostile candidates are contained, score 0, leave nothing behind, and the next one runs.

Each hostile candidate stands in for a solution of ``add(a, b)``: it attacks instead of adding, so it must
score 0; after it, no process of the sandbox's uid may remain (checked in /proc), no per-run cgroup folder may
remain, and a correct ``add`` must pass in the same sandbox. Runs on every isolating backend this machine has
(bubblewrap and util-linux ``unshare``); the tests fail, never skip, when neither works.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from posttrain.rewards.sandbox import Sandbox, SandboxError, SandboxLimits, SandboxResult

GOOD = "def add(a, b):\n    return a + b\n"
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
ROOT = os.geteuid() == 0
LIMITS = SandboxLimits(
    wall_time_s=4.0, test_time_s=2.0, cpu_time_s=4, memory_bytes=1 << 30, processes=24, tmpfs_bytes=32 << 20
)
BACKENDS = [b for b, tool in (("bwrap", "bwrap"), ("unshare", "unshare")) if shutil.which(tool)]


def test_an_isolating_backend_is_installed() -> None:
    """CI installs bubblewrap; without it util-linux unshare must do. Neither means no sandbox: fail loudly."""
    assert BACKENDS, "neither bwrap nor unshare is installed: apt-get install -y bubblewrap"


@pytest.fixture(scope="module", params=BACKENDS)
def sandbox(request: pytest.FixtureRequest) -> Sandbox:
    # uids of its own, so "no process of the sandbox's users remains" cannot be confused by anything else.
    uid = 170000 + 64 * secrets.randbelow(300)
    return Sandbox(LIMITS, backend=request.param, uid=uid, gid=uid, uid_count=8)


def _processes_of(uid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        real_uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
        if int(real_uid) == uid:
            pids.append(int(entry.name))
    return pids


def _assert_clean_and_usable(sandbox: Sandbox) -> None:
    """Nothing of the sandbox's uid runs any more, no run cgroup is left, and a correct candidate passes."""
    if ROOT:
        run_uids = set(sandbox.uids) - set(sandbox.test_server_uids)
        assert len(run_uids) >= len(sandbox.uids) - 1
        assert [p for uid in run_uids for p in _processes_of(uid)] == []
    for cgroup in (sandbox.info.pids_cgroup, sandbox.info.memory_cgroup):
        if cgroup is not None:
            base = Path(cgroup.split(" (")[0])
            assert [p.name for p in base.iterdir() if p.is_dir()] == []
    good = sandbox.run_tests(GOOD, [TEST], "add")
    assert good.passed == [True] and good.token_ok


def _hostile(sandbox: Sandbox, body: str, *, prelude: str = "") -> SandboxResult:
    program = prelude + "def add(a, b):\n" + "".join(f"    {line}\n" for line in body.strip("\n").splitlines())
    result = sandbox.run_tests(program, [TEST], "add")
    assert result.passed == [False] and result.fraction == 0.0
    return result


def test_info_reports_real_isolation(sandbox: Sandbox) -> None:
    info = sandbox.info
    assert info.backend in ("bwrap", "unshare")
    assert {"user", "pid", "net", "mount"} <= set(info.namespaces)
    if ROOT:
        assert info.unprivileged and info.uid == sandbox.uid != 0
    probe = sandbox.run_tests(
        "import os\nUID = os.getuid()\nROOT = sorted(os.listdir('/'))\n",
        ["assert 'home' not in ROOT and 'root' not in ROOT and 'work' not in ROOT, ROOT"],
    )
    assert probe.passed == [True]


def test_correct_and_wrong_candidates(sandbox: Sandbox) -> None:
    ok = sandbox.run_tests(GOOD, [TEST, "def check(candidate):\n    assert candidate(1, 1) == 3\n"], "add")
    assert ok.passed == [True, False] and ok.token_ok and ok.fraction == 0.5
    plain = sandbox.run_tests("x = [1, 2]", ["assert sum(x) == 3", "assert len(x) == 3", "import math"])
    assert plain.passed == [True, False, True]
    broken = sandbox.run_tests("def add(a, b) return a", [TEST], "add")  # a syntax error fails every test
    assert broken.passed == [False]


def test_fork_bomb(sandbox: Sandbox) -> None:
    start = time.monotonic()
    result = _hostile(
        sandbox,
        """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
""",
    )
    assert time.monotonic() - start < LIMITS.wall_time_s + 3
    assert result.timed_out or not result.token_ok or result.passed == [False]
    _assert_clean_and_usable(sandbox)


def test_fork_bomb_is_capped_by_the_process_limit(sandbox: Sandbox) -> None:
    """The harness counts how many forks succeed: never more than the limit, although the bomb asks for 500."""
    result = sandbox.run_tests(
        "import os, time\nmade = 0\nfor _ in range(500):\n    try:\n        pid = os.fork()\n    except OSError:\n"
        "        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n    made += 1\n",
        ["assert made < 24, made", "assert made > 5, made"],
    )
    assert result.passed == [True, True], result.output
    _assert_clean_and_usable(sandbox)


def test_infinite_loop(sandbox: Sandbox) -> None:
    result = _hostile(sandbox, "while True:\n    pass")
    assert result.token_ok and not result.timed_out  # the per-test timer broke it off; the harness reported
    _assert_clean_and_usable(sandbox)


def test_infinite_loop_that_ignores_the_test_timer(sandbox: Sandbox) -> None:
    """The candidate turns its own timer off; the test's timer runs in the test process, out of its reach, so the
    test fails on time and the verdict still comes (the candidate's process is killed after it)."""
    start = time.monotonic()
    result = _hostile(sandbox, "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass")
    assert result.token_ok and not result.timed_out
    assert LIMITS.per_test_s <= time.monotonic() - start < LIMITS.per_test_s + 1.5
    _assert_clean_and_usable(sandbox)


def test_20_gb_allocation(sandbox: Sandbox) -> None:
    result = _hostile(sandbox, "x = bytearray(20 * 2**30)\nreturn a + b")
    assert not result.timed_out
    _assert_clean_and_usable(sandbox)


@pytest.mark.parametrize("where", ["big.bin", "/tmp/posttrain-big.bin"])
def test_2_gb_file(sandbox: Sandbox, where: str) -> None:
    host_twin = Path("/tmp") / f"posttrain-big-{secrets.token_hex(6)}.bin"
    result = _hostile(
        sandbox,
        f"""
import os
for path in ({where!r}, {str(host_twin)!r}):
    try:
        with open(path, "wb") as f:
            for _ in range(2048):
                f.write(bytes(2**20))
    except OSError as exc:
        print("refused", path, exc.errno, os.path.getsize(path), flush=True)
return None
""",
    )
    refusals = [line.split() for line in result.output.splitlines() if line.startswith("refused")]
    assert len(refusals) == 2, result.output
    assert all(int(size) <= LIMITS.file_size_bytes for *_, size in refusals)
    assert not host_twin.exists()
    _assert_clean_and_usable(sandbox)


def test_socket_to_a_real_listener_receives_nothing(sandbox: Sandbox) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.settimeout(0.2)
    received: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                received.append(conn.recv(1024) or b"<connected>")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        # The listener is real: a plain connection from the host gets through.
        with socket.create_connection(("127.0.0.1", port), timeout=2) as probe:
            probe.sendall(b"host")
        for _ in range(50):
            if received:
                break
            time.sleep(0.02)
        assert received == [b"host"]
        received.clear()
        result = _hostile(
            sandbox,
            f"""
import socket
s = socket.create_connection(("127.0.0.1", {port}), timeout=2)
s.sendall(b"LEAK")
return a + b
""",
        )
        time.sleep(0.3)
        assert received == []
        assert result.token_ok  # the harness saw the connection fail and reported: contained, not crashed
    finally:
        stop.set()
        thread.join(timeout=2)
        listener.close()
    _assert_clean_and_usable(sandbox)


def test_background_process_does_not_outlive_the_run(sandbox: Sandbox) -> None:
    result = _hostile(
        sandbox,
        """
import os, subprocess, sys
p = subprocess.Popen(["sleep", "1000"], start_new_session=True)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sleep", ["sleep", "999"])
    os._exit(0)
print("spawned", p.pid, flush=True)
return a + b + 1
""",
    )
    assert "spawned" in result.output  # the attack really ran
    _assert_clean_and_usable(sandbox)


def test_writing_outside_its_folder(sandbox: Sandbox, tmp_path: Path) -> None:
    existing = tmp_path / "existing.txt"
    existing.write_text("host data\n")
    fresh = tmp_path / "fresh.txt"
    host_tmp = Path("/tmp") / f"posttrain-escape-{secrets.token_hex(6)}"
    result = _hostile(
        sandbox,
        f"""
import os
hits = []
for path in ({str(existing)!r}, {str(fresh)!r}, {str(host_tmp)!r}, "/usr/posttrain-escape", "/escape"):
    try:
        with open(path, "a") as f:
            f.write("escaped")
        hits.append(path)
    except OSError:
        pass
print("written", hits, flush=True)
return None
""",
    )
    assert "written" in result.output
    assert existing.read_text() == "host data\n"
    assert not fresh.exists()
    assert not host_tmp.exists()
    assert not Path("/usr/posttrain-escape").exists() and not Path("/escape").exists()
    _assert_clean_and_usable(sandbox)


@pytest.mark.parametrize(
    "program",
    [
        "exit(0)\n" + GOOD.replace("a + b", "a - b"),  # leaves before the tests run
        "import os\nos._exit(0)\n",  # leaves without any exception the harness could see
        "def add(a, b):\n    raise SystemExit(0)\n",  # exits from inside the test
        "import sys\nprint('ALL TESTS PASSED')\nprint('1')\nsys.stdout.flush()\nimport os\nos._exit(0)\n",
        (  # guesses the result protocol, not the token
            "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'S' + b'0' * 32 + b'\\n1')\n"
            "    except OSError:\n        pass\nos._exit(0)\n"
        ),
        "import builtins\nbuiltins.exec = lambda *a, **k: None\ndef add(a, b):\n    return 0\n",
    ],
    ids=["exit-early", "os-exit", "systemexit-in-test", "fake-success", "forged-result", "patched-exec"],
)
def test_cheats_do_not_pass(sandbox: Sandbox, program: str) -> None:
    result = sandbox.run_tests(program, [TEST], "add")
    assert result.passed == [False]
    _assert_clean_and_usable(sandbox)


def test_stdin_stdout_cases(sandbox: Sandbox) -> None:
    program = "n = int(input())\nprint(n * 2)\nimport sys\nsys.exit(0)\n"
    result = sandbox.run_io(program, [("2\n", "4\n"), ("5", "10"), ("3\n", "7\n"), ("x\n", "")])
    assert result.token_ok and result.passed == [True, True, False, False]
    assert result.outputs[:3] == ["4\n", "10\n", "6\n"]
    hang = sandbox.run_io("import time\ntime.sleep(60)\n", [("", "")])
    assert hang.passed == [False]
    # The harness is the namespace's init: a candidate cannot kill it to make the run end its own way.
    rogue = sandbox.run_io("import os\nos.kill(os.getppid(), 9)\nos.kill(1, 9)\nprint('5')\n", [("2\n", "4\n")])
    assert rogue.token_ok and rogue.passed == [False] and rogue.outputs == ["5\n"]
    _assert_clean_and_usable(sandbox)


def test_parallel_runs_do_not_interfere(sandbox: Sandbox) -> None:
    """A fork bomb and correct candidates at the same time: the correct ones still pass."""
    from concurrent.futures import ThreadPoolExecutor

    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    jobs = [(bomb, "add")] + [(GOOD, "add")] * 5
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda job: sandbox.run_tests(job[0], [TEST], job[1]), jobs))
    assert results[0].passed == [False]
    assert all(r.passed == [True] for r in results[1:]), [r.output for r in results[1:]]
    _assert_clean_and_usable(sandbox)


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="wall_time_s"):
        SandboxLimits(wall_time_s=0)
    with pytest.raises(ValueError, match="processes"):
        SandboxLimits(processes=1)
    if ROOT:
        with pytest.raises(ValueError, match="RLIMIT_NPROC"):
            Sandbox(uid=0)


def test_a_missing_interpreter_is_a_sandbox_error_not_a_failed_candidate() -> None:
    sandbox = Sandbox(LIMITS, python="/nonexistent/python3")
    with pytest.raises(SandboxError, match="no sandbox backend works"):
        sandbox.run_tests(GOOD, [TEST], "add")


def test_process_backend_is_explicit_and_honest_about_it() -> None:
    """The weak fallback is never picked by ``auto``; chosen by name it says what it lacks, and still kills
    what the candidate leaves running and refuses cheats."""
    uid = 190000 + secrets.randbelow(5000)
    sandbox = Sandbox(LIMITS, backend="process", uid=uid, gid=uid, uid_count=2)
    info = sandbox.info
    assert info.backend == "process" and info.namespaces == () and "not isolated" in info.network
    assert Sandbox(LIMITS).info.backend in ("bwrap", "unshare")
    result = sandbox.run_tests(
        "import subprocess\nsubprocess.Popen(['sleep', '100'], start_new_session=True)\n" + GOOD, [TEST], "add"
    )
    assert result.passed == [True]
    assert sandbox.run_tests("import os\nos._exit(0)\n", [TEST], "add").passed == [False]
    if ROOT:
        # A zombie waits for the host's init to reap it; it runs nothing.
        run_uids = {uid, uid + 1} - set(sandbox.test_server_uids)
        leftovers = [p for u in run_uids for p in _processes_of(u) if _state(p) not in ("Z", "X", None)]
        assert leftovers == []


def test_a_killed_host_takes_its_sandbox_with_it(sandbox: Sandbox) -> None:
    """The reward pool kills a worker on its time limit: the sandbox it was running must die with it."""
    import subprocess
    import sys
    import textwrap

    uid = 195000 + secrets.randbelow(4000)
    code = textwrap.dedent(f"""
        from posttrain.rewards.sandbox import Sandbox, SandboxLimits
        sandbox = Sandbox(SandboxLimits(wall_time_s=60, test_time_s=60), backend={sandbox.info.backend!r},
                          uid={uid}, gid={uid}, uid_count=2)
        _ = sandbox.info
        print("ready", flush=True)
        sandbox.run_tests("import signal, time\\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\\ntime.sleep(600)",
                          ["pass"])
    """)
    host = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout is not None and host.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 10
        while ROOT and not _processes_of(uid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if ROOT:
            assert _processes_of(uid), "the sleeping candidate never started"
    finally:
        host.kill()
        host.wait()
    if ROOT:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            running = [p for u in (uid, uid + 1) for p in _processes_of(u) if _state(p) not in ("Z", "X", None)]
            if not running:
                break
            time.sleep(0.05)
        assert running == []


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return None


def test_auto_falls_back_to_unshare_then_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without bwrap, ``auto`` takes unshare; without both it refuses with the fix, never runs unisolated."""
    import posttrain.rewards.sandbox as sandbox_module

    real_which = shutil.which
    missing: set[str] = {"bwrap"}
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: None if name in missing else real_which(name))
    if real_which("unshare"):
        fallback = Sandbox(LIMITS)
        assert fallback.info.backend == "unshare"
        assert fallback.run_tests(GOOD, [TEST], "add").passed == [True]
    missing.add("unshare")
    with pytest.raises(SandboxError, match="apt-get install -y bubblewrap"):
        _ = Sandbox(LIMITS).info


# -- the harness's plain-data codec, tested as code on the host --------------------------------------------------


def test_plain_data_crosses_with_its_exact_types() -> None:
    from posttrain.rewards.code_harness import decode, encode

    values = [
        None,
        True,
        False,
        0,
        -1,
        2**200,
        -(2**70) + 3,
        0.1,
        -0.0,
        float("inf"),
        -float("inf"),
        1e-310,
        "",
        "héllo \udcff",
        b"\x00\xff",
        [],
        (),
        {},
        set(),
        frozenset({1, 2}),
        [1, (2.5, "x"), {"k": [None, b"v"]}, {3, 4}],
        {(1, 2): frozenset({"a"}), 5: {6: 7}},
    ]
    for value in values:
        back = decode(encode(value))
        assert back == value and repr(back) == repr(value)
        assert type(back) is type(value)
    nan = decode(encode(float("nan")))
    assert type(nan) is float and math.isnan(nan)
    nested = decode(encode([[1.0], ("a",)]))
    assert type(nested[0][0]) is float and type(nested[1]) is tuple
    assert decode(encode(True)) is True and type(decode(encode(1))) is int  # bool and int stay apart


@pytest.mark.parametrize(
    "value",
    [
        type("F", (float,), {})(1.0),
        type("I", (int,), {})(1),
        type("S", (str,), {})("s"),
        type("L", (list,), {})(),
        [1, object()],
        {"k": lambda: 1},
        1j,
        bytearray(b"x"),
        range(3),
        iter([1]),
    ],
    ids=["float-sub", "int-sub", "str-sub", "list-sub", "object", "function", "complex", "bytearray", "range", "iter"],
)
def test_anything_else_is_refused_with_a_reason(value: object) -> None:
    from posttrain.rewards.code_harness import NotPlainData, encode

    with pytest.raises(NotPlainData, match="is not plain data"):
        encode(value)


def test_self_containing_and_too_deep_values_are_refused() -> None:
    from posttrain.rewards.code_harness import MAX_DEPTH, NotPlainData, encode

    loop: list = []
    loop.append(loop)
    with pytest.raises(NotPlainData, match="deeper"):
        encode(loop)
    deep: list = []
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(NotPlainData, match="deeper"):
        encode(deep)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"Q",
        b"i\x00\x00\x00\x09\x01",  # a length beyond the end
        b"l\xff\xff\xff\xff",  # a count beyond the end
        b"NN",  # bytes after the value
        b"e\x00\x00\x00\x01l\x00\x00\x00\x00",  # an unhashable set item
        b"d\x00\x00\x00\x01l\x00\x00\x00\x00N",  # an unhashable key
        b"f1.0",  # an unterminated float
        b"fnope;",
        b"s\x00\x00\x00\x01\xff",  # not UTF-8
        b"l\x00\x00\x00\x01" * 200 + b"N",  # nested deeper than allowed
    ],
)
def test_malformed_messages_are_refused(data: bytes) -> None:
    from posttrain.rewards.code_harness import MalformedMessage, decode

    with pytest.raises(MalformedMessage):
        decode(data)


def test_the_test_process_is_apart_from_the_candidate(sandbox: Sandbox) -> None:
    """Other PID, mount and user namespaces (and under bubblewrap, whose namespaces keep the host uid, another
    uid), not dumpable, and no writable folder in common: what the candidate writes to its /tmp, /dev/shm and
    working folder is not in the test process's."""
    program = (
        "import os\n"
        "for folder in ('/tmp', '/dev/shm', os.getcwd()):\n"
        "    with open(os.path.join(folder, 'dropped-by-candidate'), 'w') as f:\n"
        "        f.write('x')\n"
        "def identity():\n"
        "    ns = [os.readlink(f'/proc/self/ns/{kind}') for kind in ('pid', 'mnt', 'user')]\n"
        "    return [os.getuid(), *ns, os.getcwd()]\n"
    )
    test = (
        "import ctypes, os\n"
        "uid, pid_ns, mnt_ns, user_ns, cwd = identity()\n"
        f"assert {sandbox.info.backend == 'unshare'} or uid != os.getuid(), (uid, os.getuid())\n"
        "assert pid_ns != os.readlink('/proc/self/ns/pid')\n"
        "assert mnt_ns != os.readlink('/proc/self/ns/mnt')\n"
        "assert user_ns != os.readlink('/proc/self/ns/user')\n"
        "assert ctypes.CDLL(None).prctl(3, 0, 0, 0, 0) == 0  # PR_GET_DUMPABLE\n"
        "for folder in ('/tmp', '/dev/shm', cwd):\n"
        "    assert not os.path.exists(os.path.join(folder, 'dropped-by-candidate')), folder\n"
    )
    result = sandbox.run_tests(program, [test])
    assert result.passed == [True], result.output
    if ROOT:  # the test server's uid is never a candidate's: both come from the pool, each held while in use
        assert len(sandbox.test_server_uids) == 1 and sandbox.test_server_uids[0] in sandbox.uids
    _assert_clean_and_usable(sandbox)


def test_a_uid_is_held_across_processes() -> None:
    """Two sandboxes sharing a pool (two reward workers, say) never run as the same uid at once."""
    import subprocess
    import sys

    from posttrain.rewards.sandbox import UidPool

    first = 240000 + 8 * secrets.randbelow(1000)
    pool = UidPool(first, 2)
    other = (
        "from posttrain.rewards.sandbox import UidPool, SandboxError\n"
        f"pool = UidPool({first}, 2)\n"
        "try:\n"
        "    with pool.lease(wait_s=0.3) as uid:\n"
        "        print('took', uid)\n"
        "except SandboxError as exc:\n"
        "    print('busy', exc)\n"
    )
    with pool.lease() as a:
        one_free = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True, check=True).stdout
        with pool.lease() as b:
            none_free = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True, check=True).stdout
    assert {a, b} == {first, first + 1}
    assert one_free.split() == ["took", str(b)]
    assert none_free.startswith("busy")


def test_the_candidates_exceptions_reach_the_tests_as_builtin_exceptions(sandbox: Sandbox) -> None:
    """A test that expects ValueError gets one, with the candidate's message; a class of the candidate's own is a
    CandidateError naming it; SystemExit fails the test even under ``except Exception``."""
    program = (
        "class Mine(Exception):\n    pass\n"
        "def parse(s):\n"
        "    if s == 'own':\n        raise Mine('mine')\n"
        "    if s == 'exit':\n        raise SystemExit(0)\n"
        "    return int(s)\n"
    )
    expects_value_error = (
        "def check(candidate):\n    try:\n        candidate('x')\n    except ValueError as exc:\n"
        "        assert str(exc) == \"invalid literal for int() with base 10: 'x'\", str(exc)\n    else:\n"
        "        raise AssertionError('no ValueError')\n"
    )
    own_class = (
        "def check(candidate):\n    try:\n        candidate('own')\n    except Exception as exc:\n"
        "        assert type(exc).__name__ == 'CandidateError' and str(exc) == 'Mine: mine', repr(exc)\n"
    )
    swallowed_exit = "def check(candidate):\n    try:\n        candidate('exit')\n    except Exception:\n        pass\n"
    result = sandbox.run_tests(program, [expects_value_error, own_class, swallowed_exit], "parse")
    assert result.passed == [True, True, False], result.output
