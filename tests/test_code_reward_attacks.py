"""Candidates that attack the code reward instead of solving the task: each must score 0, by construction.

Every attack is a real program run in the real sandbox (bubblewrap where installed, else util-linux unshare),
mostly on the real HumanEval tasks, and each test also checks that the attack really ran (it prints what it did)
and that the honest solution of the same task still scores 1, so a test cannot pass because nothing was judged.
The candidate runs in one sandboxed process and the tests in another (another uid, other namespaces, not
dumpable), with only plain data crossing between them: stack walking, always-equal objects, patched modules, a
rewritten result list, redefined prompt helpers, attacks on the test process and forged messages cannot reach
the verdict. stdin/stdout programs are a sealed memfd; the expected outputs never enter the sandbox. A memory hog
spread over several processes stays within ``memory_bytes`` altogether.
"""

from __future__ import annotations

import gzip
import json
import secrets
import threading
import time
from pathlib import Path

import pytest
from posttrain.rewards.code import code_reward
from posttrain.rewards.sandbox import Sandbox, SandboxLimits


@pytest.fixture(scope="module")
def humaneval(shared_data: Path) -> dict[str, dict]:
    path = shared_data / "humaneval" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert len(rows) == 164, f"{path}: expected 164 problems, found {len(rows)}"
    return {r["entry_point"]: r for r in rows}


def _score(rows: list[dict], completions: list[str]) -> list[float | None]:
    return code_reward(
        [r["prompt"] for r in rows],
        completions,
        test=[r["test"] for r in rows],
        entry_point=[r["entry_point"] for r in rows],
        workers=2,
    )


def _fenced(row: dict, body: str, *, before: str = "") -> str:
    """A chat answer: the whole function (the prompt's signature, ``body`` as its body), ``before`` above it."""
    header = row["prompt"][row["prompt"].index(f"def {row['entry_point']}") :]
    return f"```python\n{before}{header}{body}```\n"


# -- (a) walking the stack to the harness ----------------------------------------------------------------------

FRAME_WALK = """\
    import os, sys
    found, frames = [], 0
    frame = sys._getframe()
    while frame is not None:
        frames += 1
        for scope in (frame.f_locals, frame.f_globals):
            for name, value in list(scope.items()):
                if isinstance(value, (list, bytearray)):
                    try:
                        value[:] = [True] * len(value) if isinstance(value, list) else b"1" * len(value)
                    except Exception:
                        pass
                if isinstance(value, dict):
                    for key in ("token", "results", "passed"):
                        if key in value:
                            found.append(key)
                if isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value):
                    found.append(value)
        frame = frame.f_back
    print("walked", frames, "frames, found", found, flush=True)
    for token in [t for t in found if len(t) == 32] + ["0" * 32]:
        for fd in range(3, 256):
            try:
                os.write(fd, b"S" + token.encode() + b"\\n" + b"1" * 64)
            except OSError:
                pass
    return True
"""


def test_stack_walk_to_the_harness_scores_zero(humaneval: dict[str, dict]) -> None:
    row = humaneval["has_close_elements"]
    assert _score([row], [FRAME_WALK]) == [0.0]
    # The walk really ran, and found no token: nothing of the tests' process is in the candidate's.
    sandbox = Sandbox()
    result = sandbox.run_tests(row["prompt"] + FRAME_WALK, [row["test"]], row["entry_point"], prelude=row["prompt"])
    assert result.passed == [False] and result.token_ok
    walked = [line for line in result.output.splitlines() if line.startswith("walked")]
    assert walked and all("found []" in line for line in walked), result.output
    assert _score([row], [row["canonical_solution"]]) == [1.0]


# -- (b) an object whose __eq__ is always true ------------------------------------------------------------------

ALWAYS_EQUAL = """\
class AlwaysEqual:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    def __lt__(self, other): return True
    def __le__(self, other): return True
    def __gt__(self, other): return True
    def __ge__(self, other): return True
    def __bool__(self): return True
    def __len__(self): return 0
    def __abs__(self): return 0
    def __sub__(self, other): return self
    def __rsub__(self, other): return self
    def __hash__(self): return 0
    def __iter__(self): return iter(())
"""


def test_always_equal_object_fails_every_humaneval_task(humaneval: dict[str, dict]) -> None:
    """Before the boundary, this object passed 157 of the 164 tasks; now it cannot cross at all."""
    rows = list(humaneval.values())
    body = "    return AlwaysEqual()\n"
    rewards = _score(rows, [_fenced(r, body, before=ALWAYS_EQUAL) for r in rows])
    passed = [r["task_id"] for r, v in zip(rows, rewards, strict=True) if v != 0.0]
    assert passed == []


@pytest.mark.parametrize(
    ("entry_point", "before", "body"),
    [
        (
            "truncate_number",
            "class F(float):\n    __eq__ = lambda s, o: True\n    __hash__ = float.__hash__\n",
            "F(0.5)",
        ),
        ("add", "class I(int):\n    __eq__ = lambda s, o: True\n    __hash__ = int.__hash__\n", "I(0)"),
        ("flip_case", "class S(str):\n    __eq__ = lambda s, o: True\n    __hash__ = str.__hash__\n", "S('')"),
        ("sort_array", "class L(list):\n    __eq__ = lambda s, o: True\n", "L()"),
        ("has_close_elements", "", "[AlwaysEqual()][0:0] or (lambda: True)"),
    ],
    ids=["float-subclass", "int-subclass", "str-subclass", "list-subclass", "function"],
)
def test_subclasses_of_plain_types_do_not_cross(
    humaneval: dict[str, dict], entry_point: str, before: str, body: str
) -> None:
    """Exact types only: a float subclass is not a float, whatever its ``__eq__`` says."""
    row = humaneval[entry_point]
    assert _score([row], [_fenced(row, f"    return {body}\n", before=ALWAYS_EQUAL + before)]) == [0.0]
    assert _score([row], [row["canonical_solution"]]) == [1.0]


def test_a_non_plain_return_value_is_a_failure_with_a_reason() -> None:
    program = "class Box:\n    pass\ndef make(x):\n    return Box()\n"
    test = "def check(candidate):\n    try:\n        candidate(1)\n    except TypeError as exc:\n        print('refused:', exc)\n        raise\n"
    result = Sandbox().run_tests(program, [test], "make")
    assert result.passed == [False] and result.token_ok
    assert "refused: make() returned what may not cross: a Box is not plain data" in result.output, result.output


# -- (c) patching a module the tests import ------------------------------------------------------------------


def test_patched_modules_do_not_reach_the_tests(humaneval: dict[str, dict]) -> None:
    row = humaneval["truncate_number"]  # its test compares with abs(...) < 1e-6
    patch = "import builtins, math\nbuiltins.abs = lambda x: 0\nmath.isclose = lambda *a, **k: True\n"
    assert _score([row], [_fenced(row, "    return 123.0\n", before=patch)]) == [0.0]
    sandbox = Sandbox()
    test = "import math\ndef check(candidate):\n    assert math.isclose(candidate(2.0), 4.0)\n"
    patched = sandbox.run_tests(
        "import math\nmath.isclose = lambda *a, **k: True\ndef double(x):\n    return 0.0\n", [test], "double"
    )
    honest = sandbox.run_tests("def double(x):\n    return 2 * x\n", [test], "double")
    assert patched.passed == [False] and patched.token_ok
    assert honest.passed == [True]


# -- (d) rewriting the harness's result list through gc --------------------------------------------------------

GC_REWRITE = """\
    import gc
    touched = 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, list) and obj and all(isinstance(x, (bool, int)) for x in obj):
                obj[:] = [True] * len(obj)
                touched += 1
            elif isinstance(obj, bytearray):
                obj[:] = b"1" * len(obj)
                touched += 1
            elif isinstance(obj, dict) and ("tests" in obj or "results" in obj):
                obj["tests"] = ["pass"]
                obj["results"] = [True]
                touched += 1
        except Exception:
            pass
    print("rewrote", touched, "objects", flush=True)
    return None
"""


def test_rewriting_result_lists_through_gc_scores_zero(humaneval: dict[str, dict]) -> None:
    row = humaneval["below_zero"]
    assert _score([row], [GC_REWRITE]) == [0.0]
    result = Sandbox().run_tests(row["prompt"] + GC_REWRITE, [row["test"]], row["entry_point"], prelude=row["prompt"])
    assert result.passed == [False] and result.token_ok
    assert "rewrote" in result.output  # the rewrite ran (on the candidate's own objects)
    assert _score([row], [row["canonical_solution"]]) == [1.0]


# -- redefined prompt helpers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry_point", "cheat"),
    [
        # The tests check poly(xs, find_zero(xs)) == 0: with poly redefined, any answer would do.
        ("find_zero", "def poly(xs, x):\n    return 0.0\n\n\ndef find_zero(xs):\n    return 0.0\n"),
        # The tests check decode(encode(s)) == s: with encode redefined as the identity, so may decode be.
        ("decode_cyclic", "def encode_cyclic(s):\n    return s\n\n\ndef decode_cyclic(s):\n    return s\n"),
        ("decode_shift", "def encode_shift(s):\n    return s\n\n\ndef decode_shift(s):\n    return s\n"),
    ],
)
def test_redefined_prompt_helpers_are_not_used_by_the_tests(
    humaneval: dict[str, dict], entry_point: str, cheat: str
) -> None:
    row = humaneval[entry_point]
    assert _score([row], [f"```python\n{cheat}```\n"]) == [0.0]
    assert _score([row], [row["canonical_solution"]]) == [1.0]
    # The same helpers, honestly redefined by a whole-file answer, change nothing either way.
    helpers = row["prompt"][: row["prompt"].index(f"def {entry_point}")]
    whole = helpers + row["prompt"][row["prompt"].index(f"def {entry_point}") :] + row["canonical_solution"]
    assert _score([row], [f"```python\n{whole}```\n"]) == [1.0]


# -- attacks on the test process -----------------------------------------------------------------------------

ATTACK_TEST_PROCESS = """\
    import ctypes, json, os, signal
    libc = ctypes.CDLL(None, use_errno=True)
    me = os.getpid()
    uids, ptraced, mems, signalled = set(), [], [], []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/status") as f:
                uids.add(int(next(l.split()[1] for l in f if l.startswith("Uid:"))))
        except OSError:
            pass
        if libc.ptrace(16, pid, 0, 0) == 0:  # PTRACE_ATTACH
            ptraced.append(pid)
        try:
            with open(f"/proc/{pid}/mem", "r+b") as f:
                mems.append(pid)
        except OSError:
            pass
    for pid in range(1, 4096):
        if pid != me:
            for sig in (signal.SIGSTOP, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                    signalled.append(pid)
                except OSError:
                    pass
    print("attack", json.dumps([os.getuid(), sorted(uids), ptraced, mems, signalled]), flush=True)
    return not operations
"""


def test_attacks_on_the_test_process_score_zero(humaneval: dict[str, dict]) -> None:
    """ptrace, /proc/PID/mem and signals against every process the candidate can see: the test process is not
    among them (another PID namespace and uid), so the verdict comes, and it is a failure."""
    row = humaneval["below_zero"]
    sandbox = Sandbox()
    program = row["prompt"] + ATTACK_TEST_PROCESS
    result = sandbox.run_tests(program, [row["test"]], row["entry_point"], prelude=row["prompt"])
    assert result.passed == [False] and result.token_ok and not result.timed_out
    lines = [line for line in result.output.splitlines() if line.startswith("attack ")]
    assert lines, result.output
    own_uid, uids, ptraced, mems, signalled = json.loads(lines[0].split(" ", 1)[1])
    assert set(uids) <= {own_uid}  # it sees nothing but its own processes: the test process is not among them
    assert set(ptraced) | set(mems) | set(signalled) <= {1}  # at most its own harness (the namespace's init)
    assert _score([row], [ATTACK_TEST_PROCESS]) == [0.0]
    assert _score([row], [row["canonical_solution"]]) == [1.0]


FORGED_REPLIES = """\
    import os
    for fd in range(3, 64):
        for seq in range(0, 40):
            message = b"l" + (3).to_bytes(4, "big") + b"i" + (1).to_bytes(4, "big") + bytes([seq]) + b"s" + (2).to_bytes(4, "big") + b"okT"
            try:
                os.write(fd, len(message).to_bytes(4, "big") + message)
            except OSError:
                break
        try:
            os.write(fd, b"\\x00\\x00\\x00\\x05garbage" + b"S" + b"0" * 32 + b"\\n" + b"1" * 8)
        except OSError:
            pass
    return False
"""


def test_forged_messages_on_the_candidates_end_of_the_call_channel_score_zero(humaneval: dict[str, dict]) -> None:
    """The candidate writes replies "True" for every request number, then garbage and a fake verdict, on every
    descriptor it has: at most its own answers change (as if it had returned them), the protocol break fails the
    remaining calls, and the result descriptor is not among them."""
    row = humaneval["below_zero"]
    assert _score([row], [_fenced(row, FORGED_REPLIES)]) == [0.0]
    at_load = "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'\\x00\\x00\\x00\\x02lX')\n    except OSError:\n        pass\n"
    # Garbage before the program finished loading is a failed candidate, not an unjudged one (None).
    assert _score([row], [_fenced(row, row["canonical_solution"], before=at_load)]) == [0.0]
    assert _score([row], [row["canonical_solution"]]) == [1.0]


def test_exit_and_fake_success_still_score_zero(humaneval: dict[str, dict]) -> None:
    row = humaneval["has_close_elements"]
    cheats = [
        "    exit(0)\n",
        "    raise SystemExit(0)\n",
        "    import os\n    print('All tests passed!', flush=True)\n    os._exit(0)\n",
        "    raise KeyboardInterrupt\n",
        "```python\nimport sys\nsys.exit(0)\n```",
    ]
    assert _score([row] * len(cheats), cheats) == [0.0] * len(cheats)


# -- stdin/stdout: the program file and the expected outputs are out of reach ---------------------------------

REWRITER = """\
import glob, os, sys
honest = "print(int(input()) ** 2)\\n"
done = []
own_fds = [p for p in glob.glob("/proc/self/fd/*") if int(p.rsplit("/", 1)[1]) > 2]  # not its stdin/out/err
for path in [sys.argv[0], "/sandbox/main.py", __file__, *own_fds, *glob.glob("/proc/1/fd/*")]:
    try:
        with open(path, "w") as f:
            f.write(honest)
        done.append(path)
    except OSError:
        pass
for path in glob.glob("/sandbox/*") + glob.glob("/tmp/*"):
    try:
        with open(path, "w") as f:
            f.write(honest)
        done.append(path)
    except OSError:
        pass
seen = ""
for path in ["/proc/1/cmdline", "/proc/1/environ", "/proc/self/environ", *glob.glob("/sandbox/*"), *glob.glob("/tmp/*")]:
    try:
        with open(path, "rb") as f:
            seen += f.read().decode("latin-1")
    except OSError:
        pass
print(-1)
# sys.argv[0] is the program that runs (a /proc/self/fd path); a new /sandbox/main.py is written, and never run
print("rewrote", [p for p in done if p.startswith("/proc/")], "marker" if MARKER in seen else "no marker")
"""


def test_stdin_stdout_program_cannot_rewrite_itself_for_later_cases() -> None:
    marker = secrets.token_hex(8)
    cases = [{"input": f"{n}\n", "output": f"{n * n}\n{marker}\n"} for n in (2, 3, 4)]
    program = f"MARKER = {marker!r}\n" + REWRITER
    rewards = code_reward(["Square it."], [f"```python\n{program}```"], tests=[cases])
    assert rewards == [0.0]
    result = Sandbox().run_io(program, [(c["input"], c["output"]) for c in cases])
    assert result.token_ok and result.passed == [False, False, False]
    for out in result.outputs:  # every case ran the attack, rewrote no program, and never saw the expected output
        assert out.startswith("-1\nrewrote []") and out.rstrip().endswith("no marker"), out
    honest = code_reward(
        ["Square it."], [f"```python\nprint(int(input()) ** 2)\nprint({marker!r})\n```"], tests=[cases]
    )
    assert honest == [1.0]


# -- memory across a candidate's processes ----------------------------------------------------------------------

HOG = """\
import os, time
def hog():
    held = []
    for _ in range(CHUNKS):
        try:
            block = bytearray(16 << 20)
            for i in range(0, len(block), 4096):
                block[i] = 1
            held.append(block)
        except MemoryError:
            break
        print(os.getpid(), "holds", 16 * len(held), "MiB", flush=True)
    time.sleep(30)
children = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        try:
            hog()
        finally:
            os._exit(0)
    children.append(pid)
time.sleep(30)
"""


def _memory_of_uids(uids: set[int]) -> int:
    """Anonymous memory (proportional: a page shared after fork counts once) of every process of ``uids``, summed,
    read from /proc on the host (not from any cgroup). File pages such as the interpreter's, which the host
    loaded first and pays for, are left out."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            uid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:")))
            if uid not in uids:
                continue
            rollup = (entry / "smaps_rollup").read_text()
        except (OSError, StopIteration):
            continue
        total += sum(int(line.split()[1]) * 1024 for line in rollup.splitlines() if line.startswith("Pss_Anon:"))
    return total


@pytest.mark.parametrize("use_cgroup", [True, False], ids=["memory-cgroup-where-writable", "rlimits"])
def test_memory_hog_over_three_processes_stays_within_the_total(use_cgroup: bool) -> None:
    """Three children each try to hold 320 MiB against a 512 MiB total (each more than half of it): the
    candidate's processes together never hold more than the total (sampled from /proc on the host)."""
    total = 512 << 20
    limits = SandboxLimits(wall_time_s=5.0, test_time_s=4.0, memory_bytes=total, processes=8)
    first = 210000 + 16 * secrets.randbelow(1000)
    sandbox = Sandbox(limits, uid=first, gid=first, uid_count=4, use_cgroup=use_cgroup)
    info = sandbox.info
    if use_cgroup and info.memory_cgroup is not None:
        assert info.memory_bound.startswith("cgroup")
    else:
        assert info.memory_bound.startswith("rlimits") and f"<= {total} bytes" in info.memory_bound
    peak, stop = [0], threading.Event()
    run_uids = set(sandbox.uids) - set(sandbox.test_server_uids)

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _memory_of_uids(run_uids))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = sandbox.run_io(HOG.replace("CHUNKS", "20"), [("", "")])
    finally:
        stop.set()
        sampler.join()
    held = {}
    for line in result.outputs[0].splitlines():
        pid, _, mib, _ = line.split()
        held[pid] = int(mib)
    assert held, "no child managed to allocate anything: the attack did not run"
    # one pass over /proc reads the processes one after another, not at one instant: memory that the limit's
    # victim is giving back while a sibling takes it can be read twice in a pass (one CI run under load read
    # 521 MiB). Two 16 MiB chunks of slack keep that out; an unenforced total lets the three hold 960 MiB
    slack = 2 * (16 << 20)
    assert peak[0] <= total + slack, (f"the candidate's processes held {peak[0] >> 20} MiB at once, over "
                                      f"{total >> 20} MiB")
    assert peak[0] > 16 << 20  # the sampler saw the hog
    sandbox.close()
