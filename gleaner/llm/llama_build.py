"""Which llama.cpp CPU code this machine runs: chosen by a real decode, never by CPUID alone.

infra/install.sh builds llama-cpp-python with upstream's runtime dispatch
(``GGML_BACKEND_DL`` + ``GGML_CPU_ALL_VARIANTS``): one ``libggml-cpu-<variant>.so``
per CPU level (x86: x64, sse42, ..., haswell, skylakex, icelake, zen4,
sapphirerapids; arm64: armv8.0 ... armv9.2). ggml's own loader picks the variant
with the highest score for the features CPUID reports. CPUID can promise more than
a virtual machine delivers: on a 2-core Intel VM reporting AMX, the
``sapphirerapids`` variant dies with SIGILL in its AMX matrix kernel
(``tileloadd``) on the first multi-token decode, while ``zen4``/``icelake`` run.

So gleaner ranks the variants by ggml's own score, then proves the best one with a
real multi-token decode with logprobs in a child process (a crash there costs
nothing), falling back variant by variant. The choice is kept in
``$GLEANER_HOME/llama-cpu.json``, keyed by the build and this machine's CPU, and
the llama.cpp server gleaner starts loads exactly that variant
(:mod:`gleaner.llm.llama_server`).

A build without variant files (a fixed-flag or native build) is used as it is;
``gleaner doctor`` says which kind is installed.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

VARIANT_PREFIX = "libggml-cpu-"
PROBE_TIMEOUT_S = 180.0
# Read in a bare interpreter (-S: no site imports): loading a variant runs its initialisers.
# ggml-base is loaded first from the variant's own folder (a variant may carry no RPATH).
SCORE_SCRIPT = (
    "import ctypes, os, sys; d = os.path.dirname(sys.argv[1]);"
    " ctypes.CDLL(os.path.join(d, 'libggml-base.so.0'), mode=ctypes.RTLD_GLOBAL);"
    " h = ctypes.CDLL(sys.argv[1]); h.ggml_backend_score.restype = ctypes.c_int;"
    " print(h.ggml_backend_score())"
)
REINSTALL_HINT = "reinstall with infra/install.sh (it builds llama-cpp-python portably)"


def state_dir() -> Path:
    return Path(os.environ.get("GLEANER_HOME", Path.home() / ".gleaner"))


def llama_lib_dir() -> Path | None:
    """llama-cpp-python's library folder, found without importing it (importing loads ggml)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def variant_files(lib_dir: Path | None = None) -> list[Path]:
    lib_dir = lib_dir or llama_lib_dir()
    if lib_dir is None or not lib_dir.is_dir():
        return []
    return sorted(p for p in lib_dir.glob(f"{VARIANT_PREFIX}*.so") if p.is_file())


def variant_name(path: Path | str) -> str:
    return Path(path).name.removeprefix(VARIANT_PREFIX).removesuffix(".so")


def cpu_flags() -> list[str]:
    """The CPU's feature flags as the kernel reports them (x86 'flags', arm 'Features')."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return sorted(value.split())
    return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "CPU part", "Model"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def signal_name(returncode: int) -> str | None:
    """'SIGILL' for a child that died of signal 4 (returncode -4, or 128+4 from a shell)."""
    number = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    if number <= 0:
        return None
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def illegal_instruction_hint() -> str:
    return (
        "this llama-cpp-python build uses CPU instructions this machine does not allow: "
        + REINSTALL_HINT
    )


@dataclass
class Choice:
    """The variant this machine runs, and what was learnt choosing it."""

    kind: str  # "dispatch" (variant files), "fixed" (no variant files), "missing"
    variant: str | None = None
    path: str | None = None
    ranked: list[tuple[str, int]] = field(default_factory=list)  # (variant, ggml score)
    failed: dict[str, str] = field(default_factory=dict)  # variant -> why it was rejected
    tokens_per_s: float | None = None
    key: str = ""

    @property
    def ok(self) -> bool:
        return self.kind == "fixed" or (self.kind == "dispatch" and self.path is not None)


def _build_key(files: list[Path]) -> str:
    import importlib.metadata

    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    parts = [version, platform.machine(), ",".join(cpu_flags())]
    parts += [f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in files]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _child(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gleaner.llm.llama_build", *args],
        capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )


def rank_variants(files: list[Path]) -> tuple[list[tuple[Path, int]], dict[str, str]]:
    """ggml's own score of every variant on this CPU (0: not supported), best first.

    Each score is read in its own child process (SCORE_SCRIPT).
    """
    scored: list[tuple[Path, int]] = []
    failed: dict[str, str] = {}
    for path in files:
        try:
            result = subprocess.run(
                [sys.executable, "-S", "-c", SCORE_SCRIPT, str(path)], capture_output=True,
                text=True, timeout=60, stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            failed[variant_name(path)] = "scoring timed out"
            continue
        if result.returncode != 0:
            failed[variant_name(path)] = _describe_exit(result)
            continue
        score = int(result.stdout.strip().splitlines()[-1])
        if score > 0:
            scored.append((path, score))
    scored.sort(key=lambda item: (-item[1], item[0].name))
    return scored, failed


def _describe_exit(result: subprocess.CompletedProcess[str]) -> str:
    name = signal_name(result.returncode)
    if name:  # the signal is the cause; the child's last lines are llama.cpp's loader chatter
        return f"died with {name}"
    tail = (result.stderr or "").strip().splitlines()[-3:]
    return f"exited with {result.returncode}" + (f": {' / '.join(tail)}" if tail else "")


def probe(path: Path | None, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[bool, str, float | None]:
    """A real multi-token decode with logprobs in a child process: (ok, why not, tokens/s)."""
    args = ["--probe"] + ([str(path)] if path else [])
    try:
        result = _child(args, timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"the probe decode did not finish within {timeout_s:.0f}s", None
    if result.returncode != 0:
        return False, _describe_exit(result), None
    document = json.loads(result.stdout.strip().splitlines()[-1])
    return True, "", document.get("tokens_per_s")


def choose(refresh: bool = False) -> Choice:
    """The variant this machine runs (cached per build and CPU; ``refresh`` probes again)."""
    if llama_lib_dir() is None:
        return Choice(kind="missing")
    files = variant_files()
    key = _build_key(files)
    cache = state_dir() / "llama-cpu.json"
    if not refresh and cache.exists():
        try:
            document = json.loads(cache.read_text())
            if document.get("key") == key:
                document["ranked"] = [tuple(item) for item in document.get("ranked", [])]
                return Choice(**document)
        except (ValueError, TypeError, OSError):
            pass
    if not files:
        ok, why, speed = probe(None)
        choice = Choice(kind="fixed", key=key, tokens_per_s=speed,
                        failed={} if ok else {"built-in": why})
        if not ok:
            choice.kind = "broken"
    else:
        ranked, failed = rank_variants(files)
        choice = Choice(kind="dispatch", key=key, failed=failed,
                        ranked=[(variant_name(p), s) for p, s in ranked])
        for path, _ in ranked:
            ok, why, speed = probe(path)
            if ok:
                choice.variant, choice.path = variant_name(path), str(path)
                choice.tokens_per_s = speed
                break
            choice.failed[variant_name(path)] = why
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(asdict(choice), indent=2))
    os.replace(tmp, cache)
    return choice


def describe(choice: Choice) -> str:
    if choice.kind == "missing":
        return "llama-cpp-python is not installed (pip install 'gleaner[local-llm]')"
    if choice.kind == "fixed":
        return "a build without CPU variants (fixed flags): it runs here"
    if choice.kind == "broken":
        return f"the installed llama.cpp build does not run here: {choice.failed}; " + \
            REINSTALL_HINT
    rejected = ", ".join(f"{name} ({why})" for name, why in choice.failed.items())
    if choice.path is None:
        return f"no CPU variant of the llama.cpp build runs here: {rejected}"
    text = f"CPU variant {choice.variant} (of {len(choice.ranked)} this CPU supports)"
    if rejected:
        text += f"; rejected: {rejected}"
    return text


# ---- the child-process side -----------------------------------------------------------------
def load_variant(path: str) -> None:
    """Register one CPU variant with the ggml that llama-cpp-python loaded (same instance)."""
    import llama_cpp  # noqa: F401  (loads libllama and, by soname, libggml)

    ggml = ctypes.CDLL("libggml.so.0")  # by soname: the copy libllama already uses
    ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    if not ggml.ggml_backend_load(path.encode()):
        raise RuntimeError(f"ggml could not load the CPU backend {path}")


def _probe(path: str | None) -> dict[str, float]:
    if path:
        load_variant(path)
    import llama_cpp

    from gleaner.models import smollm2_gguf

    model = llama_cpp.Llama(model_path=str(smollm2_gguf()), n_ctx=512, n_threads=1,
                            logits_all=True, verbose=False)
    prompt = "Explain, step by step, why the sky looks blue during the day. " * 6
    started = time.perf_counter()
    out = model.create_completion(prompt, max_tokens=8, temperature=0.0, logprobs=5)
    seconds = time.perf_counter() - started
    if not out["choices"][0]["logprobs"]["top_logprobs"]:
        raise RuntimeError("the decode returned no logprobs")
    tokens = out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    return {"tokens_per_s": round(tokens / seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", nargs="?", const="", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true",
                        help="choose (again) and prove the CPU variant; non-zero exit if none runs")
    args = parser.parse_args(argv)
    if args.probe is not None:
        print(json.dumps(_probe(args.probe or None)))
        return 0
    choice = choose(refresh=args.check)
    print(f"llama.cpp on {cpu_model()}: {describe(choice)}")
    if choice.tokens_per_s:
        print(f"  probe decode: {choice.tokens_per_s} tokens/s on 1 thread")
    return 0 if choice.ok else 1


if __name__ == "__main__":
    sys.exit(main())
