"""Run a function from an answer against test cases, in a child process that can do little harm.

The child is `python -I -B` in a fresh scratch directory (its cwd, HOME and TMPDIR, removed afterwards) with a
minimal environment and resource limits (CPU seconds, address space, no core files, small files, few open
files), killed with its whole process group at a wall-clock timeout. Before the answer's code runs, an audit hook
(`sys.addaudithook`, which cannot be removed, its state out of the answer's reach) refuses sockets,
subprocesses, exec/fork/kill, ctypes, gc introspection, and any write, delete, rename or mode change outside the
scratch directory. Where `unshare -rn` (or `unshare -n`) works,
the child also runs in a network namespace of its own, without network devices.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PYTHON_FENCES = ("", "python", "python3", "py", "py3", "pycon", "ipython")


@dataclass(frozen=True)
class SandboxResult:
    function: str
    passed: int
    total: int
    error: str | None  # the first failure, one line
    timed_out: bool
    seconds: float
    scratch: str  # the scratch directory the child ran in (already removed)
    errors: tuple[
        str | None, ...
    ] = ()  # per test: None when it passed, else why not ("not run" if never reached)


# ---------------------------------------------------------------- finding the code in an answer

_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:\n[ \t]*```|\Z)", re.S)
_DEF = re.compile(r"^([ \t]*)(?:async[ \t]+)?def[ \t]+\w+[ \t]*\(")
_IMPORT = re.compile(r"^[ \t]*(?:import[ \t]+[\w.]|from[ \t]+[\w.]+[ \t]+import[ \t])")
_INLINE_DEF = re.compile(r"(?:^|[\s`])(def[ \t]+\w+[ \t]*\([^\n]*)")


def _strip_prompts(block: str) -> str:
    lines = block.splitlines()
    if not any(line.startswith(">>>") for line in lines):
        return block
    return "\n".join(line[4:] for line in lines if line.startswith((">>> ", "... ", ">>>", "...")))


def _bare_blocks(answer: str) -> list[str]:
    """`def` blocks written without a fence, with the import lines of the answer."""
    lines = answer.splitlines()
    imports = [ln.strip() for ln in lines if _IMPORT.match(ln)]
    blocks: list[str] = []
    i = 0
    while i < len(lines):
        m = _DEF.match(lines[i])
        if not m:
            inline = _INLINE_DEF.search(lines[i])
            if inline:  # `def f(a, b): return ...` inside a sentence or backticks
                blocks.append(inline.group(1).split("`")[0].rstrip())
            i += 1
            continue
        indent = len(m.group(1).expandtabs())
        start = i
        while start > 0 and lines[start - 1].strip().startswith("@"):
            start -= 1
        j = i + 1
        while j < len(lines) and (
            not lines[j].strip() or len(lines[j].expandtabs()) - len(lines[j].expandtabs().lstrip()) > indent
        ):
            j += 1
        body = [ln.expandtabs()[indent:] if ln.strip() else "" for ln in lines[start:j]]
        blocks.append("\n".join(body).rstrip())
        i = j
    return [*imports, *blocks] if blocks else []


def extract_code(answer: str) -> tuple[str | None, str | None]:
    """(source, None) with the answer's Python code, or (None, why not)."""
    blocks = [_strip_prompts(body) for lang, body in _FENCE.findall(answer) if lang.lower() in PYTHON_FENCES]
    if not any("def " in b or "lambda" in b for b in blocks):
        if re.search(r"^>>> ", answer, re.M):  # an interpreter session
            blocks = [_strip_prompts(answer)]
        else:
            blocks = _bare_blocks(answer) or blocks
    if not blocks:
        return None, "no code"
    source = "\n\n".join(blocks)
    try:
        ast.parse(source)
        return source, None
    except SyntaxError as err:
        first = f"syntax error: {err.msg} (line {err.lineno})"
    good = []
    for b in blocks:
        try:
            ast.parse(b)
            good.append(b)
        except SyntaxError:
            pass
    return ("\n\n".join(good), None) if good else (None, first)


def _accepts(args: ast.arguments, n: int) -> bool:
    npos = len(args.posonlyargs) + len(args.args)
    required = npos - len(args.defaults)
    kw_required = any(d is None for d in args.kw_defaults)
    return not kw_required and required <= n and (npos >= n or args.vararg is not None)


def pick_function(source: str, n_args: int, hints: Sequence[str] = ()) -> str | None:
    """The top-level function to test: one that takes `n_args` positional arguments, preferring the earliest
    hint its name contains (e.g. 'vector' before 'add'), then the last one defined."""
    names: list[str] = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and _accepts(node.args, n_args):
            names.append(node.name)
        elif (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Lambda)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and _accepts(node.value.args, n_args)
        ):
            names.append(node.targets[0].id)
    if not names:
        return None

    def rank(name: str) -> int:
        hits = [i for i, h in enumerate(hints) if h.lower() in name.lower()]
        return min(hits) if hits else len(hints)

    best = min(rank(n) for n in names)
    return [n for n in names if rank(n) == best][-1]


# ---------------------------------------------------------------- the child

_RUNNER = r"""
import io, json, math, os, resource, sys
cfg = json.loads(sys.stdin.read())
sys.stdin = io.StringIO("")
for _name, _value in cfg["limits"].items():  # soft = hard: the answer cannot raise them again
    try:
        resource.setrlimit(getattr(resource, _name), (_value, _value))
    except (ValueError, OSError):
        pass
OUT = os.dup(1)
_nul = os.open(os.devnull, os.O_WRONLY)
os.dup2(_nul, 1)
os.dup2(_nul, 2)
np = None
if cfg["numpy"]:
    try:
        import numpy as np
    except Exception:
        np = None
import subprocess, _posixsubprocess  # imported now, so that answers may import them; their use is refused

def _refused(*args, **kwargs):
    raise PermissionError("sandbox: starting processes is not allowed")

_posixsubprocess.fork_exec = _refused
subprocess._fork_exec = _refused
NONCE = cfg["nonce"]

def emit(obj):
    os.write(OUT, (NONCE + json.dumps(obj) + "\n").encode())

_HOOK = '''
import os, sys
BLOCKED = ("socket.", "ctypes.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
           "os.system", "os.kill", "os.killpg", "os.startfile", "pty.", "resource.setrlimit",
           "resource.prlimit", "webbrowser.", "os.chroot", "os.setuid", "os.setgid", "gc.get_")
PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.rename": 2, "os.replace": 2, "os.mkdir": 1,
               "os.chmod": 1, "os.chown": 1, "os.link": 2, "os.symlink": 2, "os.truncate": 1,
               "os.utime": 1, "shutil.rmtree": 1, "shutil.copyfile": 2, "shutil.copytree": 2,
               "shutil.move": 2, "os.setxattr": 1, "os.removexattr": 1, "os.mkfifo": 1, "os.mknod": 1}
BLOCKED_IMPORTS = {"_ctypes", "ctypes"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

def inside(path):
    if isinstance(path, int) or path is None:
        return False
    try:
        p = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return p == SCRATCH or p.startswith(SCRATCH + os.sep)

def hook(event, args):
    if event.startswith(BLOCKED):
        raise PermissionError("sandbox: " + event + " is not allowed")
    if event == "import" and args[0] in BLOCKED_IMPORTS and args[0] not in sys.modules:
        raise PermissionError("sandbox: import " + args[0] + " is not allowed")
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None))[:3]
        writing = bool((flags or 0) & WRITE_FLAGS) or any(c in (mode or "") for c in "wax+")
        if writing and not inside(path):
            raise PermissionError("sandbox: writing " + repr(path) + " is not allowed")
    elif event in PATH_EVENTS:
        for p in args[: PATH_EVENTS[event]]:
            if not inside(p):
                raise PermissionError("sandbox: " + event + " on " + repr(p) + " is not allowed")
'''
_private = {"SCRATCH": os.path.realpath(cfg["scratch"])}  # the hook's globals: not reachable from __main__
exec(_HOOK, _private)
sys.addaudithook(_private["hook"])
del _private, _HOOK

def norm(v, depth=0):
    if depth > 50:
        return v
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
        v = v.tolist()
    if isinstance(v, (str, bytes, dict, int, float, complex)) or v is None:
        return v
    if isinstance(v, (list, tuple)) or hasattr(v, "__iter__"):
        return [norm(x, depth + 1) for x in v]
    return v

def same(a, e):
    if isinstance(e, list):
        return isinstance(a, list) and len(a) == len(e) and all(same(x, y) for x, y in zip(a, e))
    if isinstance(e, bool) or isinstance(a, bool):
        return type(a) is type(e) and a == e
    if isinstance(e, (int, float)) and isinstance(a, (int, float)):
        return math.isclose(a, e, rel_tol=1e-9, abs_tol=1e-9)
    return a == e

def one_line(err):
    text = (type(err).__name__ + ": " + str(err)).strip()
    return text.splitlines()[0][:200]

def attempt(fn, args, expected, convert):
    try:
        got = norm(fn(*[convert(a) for a in args]))
    except BaseException as err:
        return False, one_line(err)
    if same(got, expected):
        return True, None
    return False, "returned " + repr(got)[:120] + ", expected " + repr(expected)[:120]

ns = {"__name__": "__answer__", "__builtins__": __builtins__}
module_error = None
try:
    exec(compile(cfg["source"], "<answer>", "exec"), ns)
except BaseException as err:
    module_error = one_line(err)
fn = ns.get(cfg["function"])
if not callable(fn):
    emit({"fatal": module_error or "function not defined"})
    os._exit(0)
for i, (args, expected) in enumerate(cfg["tests"]):
    ok, why = attempt(fn, args, expected, lambda a: a)
    if not ok and np is not None:
        ok2, _ = attempt(fn, args, expected, lambda a: np.array(a) if isinstance(a, list) else a)
        ok = ok or ok2
    emit({"i": i, "ok": ok, "error": None if ok else why})
os._exit(0)
"""


@functools.lru_cache(maxsize=1)
def _net_prefix() -> tuple[str, ...]:
    """`unshare -rn` (or `-n`) when it works here: the child then has no network at all."""
    exe = shutil.which("unshare")
    if not exe:
        return ()
    for flags in ("-rn", "-n"):
        try:
            p = subprocess.run(
                [exe, flags, sys.executable, "-I", "-c", "pass"],
                capture_output=True,
                timeout=10,
                env={"PATH": "/usr/bin:/bin"},
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if p.returncode == 0:
            return (exe, flags)
    return ()


def run_tests(
    source: str,
    function: str,
    tests: Sequence[tuple[Sequence[Any], Any]],
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 1024,
    file_kb: int = 1024,
) -> SandboxResult:
    """Run `function(*args)` of `source` for each (args, expected) in a sandboxed child; count the passes."""
    scratch = tempfile.mkdtemp(prefix="qabot-sandbox-")
    nonce = secrets.token_hex(12)
    uses_numpy = bool(re.search(r"\bnumpy\b|\bnp\.", source))
    cpu_s = max(1, int(timeout_s + 0.999))
    limits = {
        "RLIMIT_CPU": cpu_s,
        "RLIMIT_AS": memory_mb << 20,
        "RLIMIT_CORE": 0,
        "RLIMIT_FSIZE": file_kb << 10,
        "RLIMIT_NOFILE": 64,
    }
    cfg = {
        "limits": limits,
        "source": source,
        "function": function,
        "tests": [[list(a), e] for a, e in tests],
        "scratch": scratch,
        "nonce": nonce,
        "numpy": uses_numpy,
    }
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": scratch,
        "TMPDIR": scratch,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        **{
            k: "1"
            for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
        },
    }
    cmd = [*_net_prefix(), sys.executable, "-I", "-B", "-c", _RUNNER]
    timed_out = False
    t0 = time.monotonic()
    out = b""
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=scratch,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        try:
            out, _ = proc.communicate(json.dumps(cfg).encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            out, _ = proc.communicate()
        finally:
            _kill_group(proc.pid)  # anything the child left behind
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.monotonic() - t0
    passed, error, seen = 0, None, 0
    errors: list[str | None] = ["not run"] * len(tests)
    for line in out.decode("utf-8", "replace").splitlines():
        if not line.startswith(nonce):
            continue
        try:
            msg = json.loads(line[len(nonce) :])
        except json.JSONDecodeError:
            continue
        if "fatal" in msg:
            error = msg["fatal"]
            errors = [error] * len(tests)
            continue
        if not isinstance(msg.get("i"), int) or not 0 <= msg["i"] < len(tests):
            continue
        seen += 1
        passed += bool(msg["ok"])
        errors[msg["i"]] = None if msg["ok"] else msg.get("error") or "failed"
        error = error or msg.get("error")
    rc = proc.returncode
    if not timed_out and rc == -signal.SIGXCPU:
        timed_out, error = True, f"CPU time limit ({cpu_s} s) reached" + (f" ({error})" if error else "")
    elif timed_out:
        error = f"timed out after {timeout_s:g} s" + (f" ({error})" if error else "")
    elif seen < len(tests) and error is None:
        why = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
        error = f"the child stopped after {seen} of {len(tests)} tests ({why})"
    return SandboxResult(function, passed, len(tests), error, timed_out, seconds, scratch, tuple(errors))


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
