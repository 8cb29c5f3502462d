"""The trusted programs that run inside the code sandbox: the candidate's server, the test runner, the I/O runner.

:mod:`posttrain.rewards.sandbox` runs this module in each sandboxed process: ``python -I -c BOOTSTRAP ROLE
JOB_FD ...`` reads the job (a ``marshal`` dict from the host, in a memfd) whose ``harness`` entry is this module,
compiled on the host when the sandbox's interpreter has the host's bytecode magic (compiling it in every process
would cost more than a HumanEval test), else its source; then it runs :func:`main`. It uses the standard
library only (Python 3.10 or later). The roles:

- ``candidate``: loads the candidate's program and answers calls to its functions, one at a time, on a pair of
  pipes (requests in, replies out). It holds no token and no verdict descriptor: everything in this process,
  this file's own code included, is the candidate's to rewrite, so nothing it says is trusted beyond being data.
- ``tests-server``: a long-lived process in a sandbox of its own (another uid, PID, user and mount namespace,
  not dumpable) that forks one fresh test process per run (:func:`run_one_test_job`), which runs the trusted
  test code and the trusted prelude (a HumanEval prompt's helpers). The name under test is a
  :class:`RemoteFunction`: calling it sends the arguments to the candidate process and decodes the reply. Only
  plain data crosses (:func:`encode`/:func:`decode`: None, bool, int, float, str, bytes and lists, tuples,
  dicts, sets and frozensets of them, exact types), so the candidate cannot hand the tests an object of its
  own (an ``__eq__`` that is always true), see the tests' frames, patch their modules or rewrite their results.
  Only the test process holds the run's result descriptor and token (the server closes its copies once it has
  forked); it writes ``S`` on start, then the token and one byte per test (``1`` passed, ``0`` failed).
- ``io``: runs the program once per stdin case, each in a fresh child process; the program is a sealed
  (immutable) memfd and each case's input and output are anonymous memfds, so no case can change what a later
  case runs or reads. It never sees the expected outputs: it sends what each case printed, the host compares.

Jobs arrive from the host as ``marshal`` data in a memfd (trusted). Data from the candidate process is only ever
read with :func:`decode`, never with ``marshal`` or ``pickle`` (neither is safe on hostile input).

This module must never trust a byte that comes from the candidate process, nor give that process any
descriptor of the test runner other than its own end of the call pipes.
"""

import builtins
import os
import sys

# ----------------------------------------------------------------------------------------------------------------
# Plain data across the process boundary: a tagged binary encoding of exact builtin types, decoded without
# evaluating anything. One tag byte, then (for sized values) a 4-byte big-endian length or count.

MAX_DEPTH = 100
"""Deepest nesting of containers that crosses (deeper is not plain data here)."""
MAX_FRAME = 32 << 20
"""Largest message, in bytes, the test runner accepts from the candidate process."""

PLAIN_TYPES = "None, bool, int, float, str, bytes, and lists, tuples, dicts, sets or frozensets of them"


class NotPlainData(TypeError):
    """A value that may not cross between the candidate and the tests (a subclass, an object, a function...)."""


class MalformedMessage(ValueError):
    """Bytes that do not decode to plain data (truncated, a bad tag, trailing bytes, too deep)."""


_CONTAINER_TAGS = {list: b"l", tuple: b"t", set: b"e", frozenset: b"z"}


def encode(value: object) -> bytes:
    """The bytes of ``value``; raises :class:`NotPlainData` naming the first value that is not plain data."""
    out: list[bytes] = []
    _encode(value, out, 0)
    return b"".join(out)


def _size(n: int) -> bytes:
    return n.to_bytes(4, "big")


def _encode(value: object, out: list[bytes], depth: int) -> None:
    kind = type(value)
    if value is None:
        out.append(b"N")
    elif kind is bool:
        out.append(b"T" if value else b"F")
    elif kind is int:
        raw = value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)  # type: ignore[attr-defined]
        out += (b"i", _size(len(raw)), raw)
    elif kind is float:
        out += (b"f", float.hex(value).encode())  # type: ignore[arg-type]
        out.append(b";")
    elif kind is str:
        raw = value.encode("utf-8", "surrogatepass")  # type: ignore[attr-defined]
        out += (b"s", _size(len(raw)), raw)
    elif kind is bytes:
        out += (b"b", _size(len(value)), value)  # type: ignore[arg-type]
    elif kind in _CONTAINER_TAGS or kind is dict:
        if depth >= MAX_DEPTH:
            raise NotPlainData(f"nested deeper than {MAX_DEPTH} containers (or a container that holds itself)")
        if kind is dict:
            out += (b"d", _size(len(value)))  # type: ignore[arg-type]
            for key, item in value.items():  # type: ignore[attr-defined]
                _encode(key, out, depth + 1)
                _encode(item, out, depth + 1)
        else:
            out += (_CONTAINER_TAGS[kind], _size(len(value)))  # type: ignore[arg-type]
            for item in value:  # type: ignore[attr-defined]
                _encode(item, out, depth + 1)
    else:
        name = getattr(kind, "__qualname__", "?")
        raise NotPlainData(f"a {name!s:.80} is not plain data (allowed: {PLAIN_TYPES}; exact types, no subclasses)")


def decode(data: bytes) -> object:
    """The value ``data`` encodes; raises :class:`MalformedMessage` on anything else. Builds only exact builtin
    types and runs no code of the sender's (a set or dict key is hashed, and plain data hashes as the builtin)."""
    try:
        value, end = _decode(data, 0, 0)
    except (IndexError, ValueError, TypeError, OverflowError) as exc:  # TypeError: an unhashable set item or key
        raise MalformedMessage(f"malformed message: {exc}") from None
    if end != len(data):
        raise MalformedMessage(f"malformed message: {len(data) - end} bytes after the value")
    return value


def _read_size(data: bytes, pos: int) -> tuple[int, int]:
    if pos + 4 > len(data):
        raise ValueError("truncated")
    n = int.from_bytes(data[pos : pos + 4], "big")
    if n > len(data) - pos - 4:  # every item takes at least one byte: no count can exceed what is left
        raise ValueError("a length beyond the end of the message")
    return n, pos + 4


def _decode(data: bytes, pos: int, depth: int) -> tuple[object, int]:
    tag = data[pos : pos + 1]
    pos += 1
    if tag == b"N":
        return None, pos
    if tag == b"T":
        return True, pos
    if tag == b"F":
        return False, pos
    if tag == b"i":
        n, pos = _read_size(data, pos)
        return int.from_bytes(data[pos : pos + n], "big", signed=True), pos + n
    if tag == b"f":
        end = data.index(b";", pos, pos + 40)
        return float.fromhex(data[pos:end].decode("ascii")), end + 1
    if tag in (b"s", b"b"):
        n, pos = _read_size(data, pos)
        raw = data[pos : pos + n]
        return (raw.decode("utf-8", "surrogatepass") if tag == b"s" else bytes(raw)), pos + n
    if tag in (b"l", b"t", b"e", b"z", b"d"):
        if depth >= MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH}")
        n, pos = _read_size(data, pos)
        items = []
        for _ in range(2 * n if tag == b"d" else n):
            item, pos = _decode(data, pos, depth + 1)
            items.append(item)
        if tag == b"l":
            return items, pos
        if tag == b"t":
            return tuple(items), pos
        if tag == b"e":
            return set(items), pos
        if tag == b"z":
            return frozenset(items), pos
        return dict(zip(items[::2], items[1::2])), pos
    raise ValueError(f"unknown tag {tag!r}")


# ----------------------------------------------------------------------------------------------------------------
# Frames on a pipe: a 4-byte big-endian length, then the message.


def _frame(payload: bytes) -> bytes:
    return _size(len(payload)) + payload


def write_frame(fd: int, payload: bytes) -> None:
    write_all(fd, _frame(payload))


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_frame(fd: int, limit: int = MAX_FRAME) -> bytes | None:
    """The next message, or None at end of file; a length over ``limit`` is a :class:`MalformedMessage`."""
    head = _read_exactly(fd, 4)
    if head is None:
        return None
    n = int.from_bytes(head, "big")
    if n > limit:
        raise MalformedMessage(f"a message of {n} bytes (the limit is {limit})")
    body = _read_exactly(fd, n)
    if body is None:
        raise MalformedMessage("the message was cut off")
    return body


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


# ----------------------------------------------------------------------------------------------------------------
# Shared by the roles


class TestTimeout(BaseException):
    """Raised by the interval timer: a test (or a call) ran past its time."""


def _on_alarm(signum: int, frame: object) -> None:
    raise TestTimeout()


def _read_job(job_fd: int) -> dict:
    import marshal

    chunks = []
    while True:
        chunk = os.read(job_fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(job_fd)
    return marshal.loads(b"".join(chunks))


def _set_rlimits(rlimits: list) -> None:
    import resource

    for name, value in rlimits:
        resource.setrlimit(getattr(resource, name), (value, value))


def _not_dumpable() -> None:
    """PR_SET_DUMPABLE 0: no process of the same uid may ptrace this one, read its memory or its /proc files.

    Through ``_ctypes`` directly: importing ``ctypes`` would cost more than half of this process's start."""
    import _ctypes

    class Prctl(_ctypes.CFuncPtr):  # int prctl(int option, ...), returning an int (the default result type)
        _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO

    class Libc:
        _handle = _ctypes.dlopen(None)

    prctl = Prctl(("prctl", Libc()))
    if prctl(4, 0, 0, 0, 0) != 0 or prctl(3, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE 0, then PR_GET_DUMPABLE
        raise OSError("prctl(PR_SET_DUMPABLE, 0) did not take")


# ----------------------------------------------------------------------------------------------------------------
# Role "candidate": load the program, then answer ["call", seq, name, args, kwargs] and ["get", seq, name].
# Replies: [seq, "ok", value] | [seq, "raise", type name, message, is an Exception] | [seq, "callable"] |
# [seq, "missing"] | [seq, "not plain", reason] | [seq, "timeout"]. Unasked, first [0, "started"] (before any of
# the candidate's code runs), then [0, "loaded"] or [0, "load failed", reason].


def serve_candidate(job: dict, requests: int, replies: int) -> None:
    import _signal as signal  # the C module: `signal` would import enum (slow starts)

    per_call = job["test_time_s"]
    signal.signal(signal.SIGALRM, _on_alarm)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    write_frame(replies, encode([0, "started"]))  # before any of the candidate's code: it cannot take this back
    try:
        signal.setitimer(signal.ITIMER_REAL, per_call)
        exec(compile(job["program"], "<candidate>", "exec"), namespace)  # noqa: S102 - the sandbox runs it
        signal.setitimer(signal.ITIMER_REAL, 0)
        reply: list = [0, "loaded"]
    except BaseException as exc:  # noqa: BLE001 - SystemExit, a syntax error, a timeout: no test can pass
        signal.setitimer(signal.ITIMER_REAL, 0)
        reply = [0, "load failed", _describe(exc)]
    write_frame(replies, encode(reply))
    if reply[1] != "loaded":
        return
    while True:
        frame = read_frame(requests, 1 << 62)  # the test runner is trusted
        if frame is None:
            return  # the tests are done
        request = decode(frame)
        write_frame(replies, _answer(request, namespace, per_call, signal))  # type: ignore[arg-type]


def _answer(request: list, namespace: dict, per_call: float, signal: object) -> bytes:
    kind, seq, name = request[0], request[1], request[2]
    missing = object()
    target = namespace.get(name, missing)
    if target is missing:
        return encode([seq, "missing"])
    if kind == "get":
        if callable(target):
            return encode([seq, "callable"])
        try:
            return encode([seq, "ok", target])
        except NotPlainData as exc:
            return encode([seq, "not plain", f"{name}: {exc}"])
    try:
        signal.setitimer(signal.ITIMER_REAL, per_call)  # type: ignore[attr-defined]
        try:
            value = target(*request[3], **request[4])
            reply = encode([seq, "ok", value])
        except NotPlainData as exc:
            reply = encode([seq, "not plain", f"{name}() returned what may not cross: {exc}"])
        except TestTimeout:
            reply = encode([seq, "timeout"])
        except BaseException as exc:  # noqa: BLE001 - SystemExit too: sent as such, the tests decide
            reply = encode([seq, "raise", type(exc).__name__, _message(exc), isinstance(exc, Exception)])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)  # type: ignore[attr-defined]
    except TestTimeout:  # the timer fired between the call's end and disarming it
        reply = encode([seq, "timeout"])
    return reply


def _message(exc: BaseException) -> str:
    try:
        text = str(exc)
    except BaseException:  # noqa: BLE001 - a candidate's __str__ may raise anything
        text = "?"
    return text[:500] if type(text) is str else "?"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_message(exc)}"


# ----------------------------------------------------------------------------------------------------------------
# Role "tests"


class CandidateError(Exception):
    """The candidate raised an exception that is not a builtin one (its type and message are in the text)."""


class CandidateAbort(BaseException):
    """The candidate left (SystemExit, os._exit), stopped answering, or broke the call protocol; every later
    call fails the same way, and no ``except Exception`` in a test catches it."""


class Channel:
    """The test runner's end of the call pipes: numbered requests, replies matched by number. Bytes read are
    kept across a test's time-out, so a reply cut in two by the timer is not lost."""

    def __init__(self, requests: int, replies: int) -> None:
        self.requests, self.replies = requests, replies
        self.seq = 0
        self.broken: str | None = None
        self._buffer = b""

    def started(self) -> bool:
        """Wait for the candidate's harness to say it started (sent before any of the candidate's code runs)."""
        try:
            return self._next_reply() == [0, "started"]
        except CandidateAbort:
            return False

    def loaded(self) -> bool:
        """Wait for the candidate's next message: whether its program loaded."""
        try:
            reply = self._next_reply()
        except CandidateAbort:
            return False
        if reply == [0, "loaded"]:
            return True
        self.broken = f"the candidate did not load: {str(reply[1:])[:200]}"
        return False

    def ask(self, message: list) -> list:
        """Send ``message`` (its number is added) and return the reply with the same number."""
        if self.broken is not None:
            raise CandidateAbort(self.broken)
        self.seq += 1
        seq = self.seq
        view = memoryview(_frame(encode([message[0], seq, *message[1:]])))  # NotPlainData: not plain arguments
        try:
            while view:
                view = view[os.write(self.requests, view) :]
        except BaseException:
            if len(view) > 0:  # cut off by the timer (or the candidate closed its end): the stream is lost
                self.broken = "a request to the candidate was cut off"
            raise
        while True:
            reply = self._next_reply()
            if reply[0] == seq:
                return reply
            if reply[0] > seq:
                self.broken = f"the candidate broke the call protocol: a reply to request {reply[0]}, not asked"
                raise CandidateAbort(self.broken)
            # an older request's reply (one a timed-out test gave up waiting for): skip it

    def _next_reply(self) -> list:
        if self.broken is not None:
            raise CandidateAbort(self.broken)
        try:
            while len(self._buffer) < 4 or len(self._buffer) < 4 + int.from_bytes(self._buffer[:4], "big"):
                if int.from_bytes(self._buffer[:4], "big") > MAX_FRAME and len(self._buffer) >= 4:
                    raise MalformedMessage(f"a message over {MAX_FRAME} bytes")
                chunk = os.read(self.replies, 1 << 16)
                if not chunk:
                    self.broken = "the candidate's process ended"
                    raise CandidateAbort(self.broken)
                self._buffer += chunk
            n = int.from_bytes(self._buffer[:4], "big")
            frame, self._buffer = self._buffer[4 : 4 + n], self._buffer[4 + n :]
            reply = decode(frame)
            if type(reply) is not list or len(reply) < 2 or type(reply[0]) is not int or type(reply[1]) is not str:
                raise MalformedMessage(f"not a reply: {str(reply)[:100]}")
            return reply
        except (MalformedMessage, OSError) as exc:
            self.broken = f"the candidate broke the call protocol: {exc}"
            raise CandidateAbort(self.broken) from None


class RemoteFunction:
    """Stands in for a function of the candidate's: arguments go out as plain data, the result comes back as
    plain data (or the candidate's exception, as a builtin exception type or :class:`CandidateError`)."""

    def __init__(self, channel: Channel, name: str) -> None:
        self._channel, self.__name__ = channel, name

    def __repr__(self) -> str:
        return f"<candidate function {self.__name__}>"

    def __call__(self, *args: object, **kwargs: object) -> object:
        reply = self._channel.ask(["call", self.__name__, list(args), kwargs])
        return _result(reply, self.__name__)


def _result(reply: list, name: str) -> object:
    kind = reply[1]
    if kind == "ok" and len(reply) == 3:
        return reply[2]
    if kind == "raise" and len(reply) == 5 and type(reply[2]) is str and type(reply[3]) is str:
        exc_type = _BUILTIN_EXCEPTIONS.get(reply[2])
        if reply[4] is True and exc_type is not None:
            raise exc_type(reply[3])
        if reply[4] is True:
            raise CandidateError(f"{reply[2]}: {reply[3]}")
        raise CandidateAbort(f"{name} raised {reply[2]}: {reply[3]}")
    if kind == "not plain" and len(reply) == 3 and type(reply[2]) is str:
        raise NotPlainData(reply[2])
    if kind == "timeout":
        raise TestTimeout()
    if kind == "missing":
        raise NameError(f"the candidate defines no {name!r}")
    raise CandidateAbort(f"unexpected reply to a call of {name}: {str(reply)[:100]}")


_BUILTIN_EXCEPTIONS = {
    name: value for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, Exception)
}


class _Resolver(dict):
    """Builtins for tests without an entry point: a name neither the test, the prelude nor the builtins define
    is the candidate's; plain data comes back as a copy, a function as a :class:`RemoteFunction`."""

    def __init__(self, builtins: dict, channel: Channel) -> None:
        super().__init__(builtins)
        self._channel = channel
        self._functions: dict[str, RemoteFunction] = {}

    def __missing__(self, name: str) -> object:
        if name in self._functions:
            return self._functions[name]
        reply = self._channel.ask(["get", name])
        if reply[1] == "callable":
            self._functions[name] = RemoteFunction(self._channel, name)
            return self._functions[name]
        if reply[1] == "missing":
            raise NameError(f"name {name!r} is not defined")
        return _result(reply, name)


def run_tests(job: dict, channel: Channel) -> bytes:
    """One byte per test, ``1`` passed or ``0`` failed; or ``X`` and why, when the candidate's harness never
    started (a failure of the sandbox, not of the candidate)."""
    import _signal as signal

    signal.signal(signal.SIGALRM, _on_alarm)
    per_test = job["test_time_s"]
    entry_point = job["entry_point"]
    tests = []
    for source in job["tests"]:
        try:
            tests.append(compile(source, "<test>", "exec"))
        except (SyntaxError, ValueError):
            tests.append(None)
    try:
        signal.setitimer(signal.ITIMER_REAL, per_test + 1.0)  # the candidate's load has per_test of its own
        if not channel.started():
            signal.setitimer(signal.ITIMER_REAL, 0)
            return b"X" + (channel.broken or "no start message").encode()  # the host raises: nothing was judged
        loaded = channel.loaded()
        signal.setitimer(signal.ITIMER_REAL, 0)
    except BaseException:  # noqa: BLE001 - the timer: it never loaded
        signal.setitimer(signal.ITIMER_REAL, 0)
        loaded = False
    if not loaded:
        return b"0" * len(tests)
    namespace: dict = {"__name__": "__test__", "__builtins__": builtins}
    prelude = job.get("prelude") or ""
    if prelude and _uses_any(tests, _defined_names(prelude) - {entry_point}):
        try:
            signal.setitimer(signal.ITIMER_REAL, per_test)
            exec(compile(prelude, "<prelude>", "exec"), namespace)  # noqa: S102 - trusted code
            signal.setitimer(signal.ITIMER_REAL, 0)
        except BaseException as exc:  # noqa: BLE001 - the tests that need what it failed to define will fail
            signal.setitimer(signal.ITIMER_REAL, 0)
            print(f"the prelude failed: {_describe(exc)}", file=sys.stderr)
    if entry_point:
        namespace[entry_point] = RemoteFunction(channel, entry_point)
    else:
        namespace["__builtins__"] = _Resolver(vars(builtins), channel)
    results = []
    for code in tests:
        ok = False
        if code is not None:
            try:
                scope = dict(namespace)
                signal.setitimer(signal.ITIMER_REAL, per_test)
                exec(code, scope)  # noqa: S102 - the trusted tests
                if entry_point:
                    scope["check"](namespace[entry_point])
                signal.setitimer(signal.ITIMER_REAL, 0)
                ok = True
            except BaseException:  # noqa: BLE001 - any failure, SystemExit and the timer included, fails it
                signal.setitimer(signal.ITIMER_REAL, 0)
        results.append(b"1" if ok else b"0")
    return b"".join(results)


def _defined_names(source: str) -> set[str]:
    """Every name the module code of ``source`` binds or reads (a superset of what it defines)."""
    try:
        return set(compile(source, "<prelude>", "exec").co_names)
    except (SyntaxError, ValueError):
        return set()


def _uses_any(codes: list, names: set[str]) -> bool:
    """Whether any of the compiled tests (or functions inside them) reads one of ``names``: the prelude is run
    only then (a prompt's ``from typing import List`` alone would cost more than most tests)."""
    stack = [c for c in codes if c is not None]
    while stack:
        code = stack.pop()
        if names.intersection(code.co_names):
            return True
        stack.extend(c for c in code.co_consts if type(c) is type(code))
    return False


# ----------------------------------------------------------------------------------------------------------------
# Role "io"


def run_io(job: dict) -> bytes:
    """Per case: [exit code or None, timed out, output too long, output text], encoded (the host decodes)."""
    import _signal as signal
    import fcntl
    import subprocess

    program = os.memfd_create("main.py", os.MFD_ALLOW_SEALING)
    write_all(program, job["program"].encode("utf-8", "surrogatepass"))
    seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
    fcntl.fcntl(program, fcntl.F_ADD_SEALS, seals)
    cap = job["case_output_bytes"]
    results = []
    for case_input in job["inputs"]:
        stdin = os.memfd_create("stdin")
        write_all(stdin, case_input.encode("utf-8", "surrogatepass"))
        os.lseek(stdin, 0, os.SEEK_SET)
        stdout = os.memfd_create("stdout")
        timed_out, code = False, None
        try:
            code = subprocess.run(
                [sys.executable, "-I", f"/proc/self/fd/{program}"],
                check=False,
                stdin=stdin,
                stdout=stdout,
                stderr=subprocess.DEVNULL,
                pass_fds=(program,),
                timeout=job["test_time_s"],
            ).returncode
        except subprocess.TimeoutExpired:
            timed_out = True
        try:
            os.kill(-1, signal.SIGKILL)  # whatever the case left running (never pid 1, never us)
        except OSError:
            pass
        os.lseek(stdout, 0, os.SEEK_SET)
        out = os.read(stdout, cap + 1)
        os.close(stdin)
        os.close(stdout)
        results.append([code, timed_out, len(out) > cap, out[:cap].decode("utf-8", "replace")])
    return encode(results)


# ----------------------------------------------------------------------------------------------------------------


BOOTSTRAP = """\
import marshal, os, sys
fd, chunks = int(sys.argv[2]), []
while chunk := os.read(fd, 1 << 20):
    chunks.append(chunk)
os.close(fd)
job, harness = marshal.loads(b"".join(chunks)), {"__name__": "code_harness"}
exec(job.pop("harness"), harness)
harness["main"](sys.argv[1:], job)
"""
"""The program ``python -c`` runs in the sandbox (argv: ROLE JOB_FD ...): it loads this module from the job."""


def main(argv: list[str], job: dict | None = None) -> None:
    """``candidate JOB_FD REQUESTS_FD REPLIES_FD`` | ``tests-server JOB_FD CONTROL_FD`` | ``io JOB_FD RESULT_FD``;
    ``job``: the job already read from JOB_FD (by :data:`BOOTSTRAP`)."""
    role, fds = argv[0], [int(a) for a in argv[1:]]
    if job is None:
        job = _read_job(fds[0])
    if role == "candidate":
        _set_rlimits(job["rlimits"])
        serve_candidate(job, fds[1], fds[2])
        os._exit(0)
    _not_dumpable()
    _set_rlimits(job["rlimits"])
    if role == "tests-server":
        serve_test_runs(fds[1])
    token, result = job.pop("token").encode(), fds[1]
    os.write(result, b"S")
    try:
        payload = run_io(job)
        sys.stdout.flush()
        sys.stderr.flush()
        write_all(result, token + b"\n" + payload)
    finally:
        os._exit(0)


# ----------------------------------------------------------------------------------------------------------------
# Role "tests-server": one long-lived process per sandbox and backend that forks a fresh test runner per run
# (starting a sandbox and an interpreter for each would cost more than most HumanEval tests). It runs no test
# itself and holds no token: each run's job, token and descriptors reach only its own child.


def serve_test_runs(control: int) -> None:
    """Read ``["run", id]`` + descriptors (job, output, result, requests, replies) or ``["kill", id]`` from the
    host's control socket until it closes; each run is a forked child that runs :func:`run_one_test_job`."""
    import marshal
    import socket

    sock = socket.socket(fileno=control)
    sock.sendall(b"ready")
    children: dict = {}
    while True:
        message, fds, _, _ = socket.recv_fds(sock, 1024, 8)
        if not message:
            os._exit(0)  # the host closed its end (or died): the namespace and every child go with us
        _reap(children)
        request = marshal.loads(message)  # from the host, trusted
        if request[0] == "kill":
            pid = children.get(request[1])
            if pid is not None:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            continue
        try:
            pid = os.fork()
        except OSError:  # out of processes or memory: this run gets no test process (the host sees no start)
            pid = -1
        if pid == 0:
            try:
                sock.close()
                run_one_test_job(fds)
            finally:
                os._exit(0)
        if pid > 0:
            children[request[1]] = pid
        for fd in fds:
            os.close(fd)


def _reap(children: dict) -> None:
    """Collect finished children (a pid not yet collected is never reused, so a later kill hits no other)."""
    done = set()
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        done.add(pid)
    for run_id in [r for r, pid in children.items() if pid in done]:
        del children[run_id]


def run_one_test_job(fds: list) -> None:
    """One run's test process: its output goes to the run's pipe, it writes ``S``, then the token and the
    results on the result pipe, which no other process holds."""
    job_fd, output, result, requests, replies = fds
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(output)
    job = _read_job(job_fd)
    _set_rlimits(job["rlimits"])
    _not_dumpable()  # inherited from the server; asserted again
    token = job.pop("token").encode()
    os.write(result, b"S")
    payload = run_tests(job, Channel(requests, replies))
    sys.stdout.flush()
    sys.stderr.flush()
    write_all(result, token + b"\n" + payload)


if __name__ == "__main__":
    main(sys.argv[1:])
