"""The LLM backends for real: the embedded GGUF model in llama.cpp, llama-cpp-python's own
OpenAI-compatible server on loopback, and broken servers whose answers must be counted, not fatal."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from edge_runtime.shield import SignalTiming
from trainer.sed.answers import TOOLS, AnswerError, AnswerFormat
from trainer.sed.llm import HttpBackend, LlamaCppBackend, LLMCallError, resolve_model

TIMING = SignalTiming(yellow=3, all_red=2, min_green=10, max_green=60)
QUESTION = [{"role": "system", "content": "You control traffic signals. Answer with JSON only."},
            {"role": "user", "content": "I1 phase 0: queue 3; phase 1: queue 9; phase 2: queue 1. "
                                        "I2 phase 0: queue 0; phase 1: queue 4. Which phase for each?"}]


@pytest.fixture(scope="module")
def local_model() -> Iterator[LlamaCppBackend]:
    # these tests check what the model answers, not how fast: a loaded machine (another llama.cpp beside it runs
    # about 10x slower) must not fail them, so the deadline is generous
    backend = LlamaCppBackend(resolve_model("smollm2"), threads=2, context=2048, gpu_layers=0, prefix_reuse=True,
                              timeout=600)
    yield backend
    backend.close()


def test_grammar_constrained_answers_always_parse(local_model: LlamaCppBackend):
    """Sampled hot, across phase tables: every answer is a valid phase choice or timing plan."""
    assert len(local_model.model_sha256) == 64
    formats = [AnswerFormat("step", ("I1", "I2"), (3, 2), TIMING),
               AnswerFormat("step", ("I1", "I2", "I3", "I4"), (4, 2, 3, 8), TIMING),
               AnswerFormat("plan", ("I1", "I2"), (3, 2), TIMING),
               AnswerFormat("plan", ("I1",), (6,), SignalTiming(yellow=3, all_red=0, min_green=7, max_green=45))]
    for fmt in formats:
        for seed in range(3 if fmt.mode == "step" else 2):
            reply = local_model.chat(QUESTION, fmt, temperature=1.5, seed=seed, max_tokens=400)
            answer = fmt.parse(reply.text)  # raises on anything invalid
            assert set(answer) == set(fmt.labels)
            assert reply.prompt_tokens > 20 and reply.completion_tokens > 3


@pytest.mark.slow
def test_hot_strategy_answers_name_only_known_tools_and_bad_parameters_are_caught(local_model: LlamaCppBackend):
    """The grammar admits only the pool's tools; what it cannot rule out (min_green above max_green) the
    validator refuses. Either way an answer is a valid strategy or an AnswerError, never anything else."""
    fmt = AnswerFormat("strategy", ("I1", "I2"), (4, 2), TIMING)
    for seed in range(3):
        reply = local_model.chat(QUESTION, fmt, temperature=1.5, seed=seed, max_tokens=120)
        named = {light["tool"] for light in json.loads(reply.text).values()}
        assert named <= set(TOOLS), reply.text
        try:
            fmt.parse(reply.text)
        except AnswerError as exc:
            assert "min_green <= max_green" in str(exc), exc


def test_a_call_over_its_time_limit_is_late(local_model: LlamaCppBackend):
    fmt = AnswerFormat("plan", ("I1", "I2", "I3", "I4"), (4, 4, 4, 4), TIMING)
    limit, local_model.timeout = local_model.timeout, 0.05
    try:
        with pytest.raises(LLMCallError) as err:
            local_model.chat(QUESTION, fmt, temperature=0.0, seed=0, max_tokens=400)
        assert err.value.late
    finally:
        local_model.timeout = limit


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def llama_server(log_dir) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server on a free loopback port, stopped afterwards."""
    port = _free_port()
    log = (log_dir / "llama_server.log").open("w")  # a file, not a pipe: its verbose log would fill a pipe
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(resolve_model("smollm2")),
                             "--host", "127.0.0.1", "--port", str(port), "--n_threads", "2", "--n_ctx", "2048"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama_cpp.server did not start: {(log_dir / 'llama_server.log').read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.slow
def test_http_backend_against_a_real_llama_cpp_server(tmp_path):
    with llama_server(tmp_path) as url:
        backend = HttpBackend(url, "default", timeout=60)
        assert "smollm2" in backend.description.lower() or "gguf" in backend.description.lower()
        fmt = AnswerFormat("step", ("I1", "I2"), (3, 2), TIMING)
        for seed in range(3):
            reply = backend.chat(QUESTION, fmt, temperature=1.0, seed=seed, max_tokens=60)
            assert set(fmt.parse(reply.text)) == {"I1", "I2"}  # the server applied the grammar
            assert reply.completion_tokens > 0


class _BrokenHandler(http.server.BaseHTTPRequestHandler):
    """/v1/models works; chat completions answer garbage or too late, as the server's mode says."""

    mode = "garbage"

    def do_GET(self) -> None:
        self._send(json.dumps({"data": [{"id": "broken"}]}).encode())

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.server.mode == "slow":  # type: ignore[attr-defined]
            time.sleep(1.5)
            self._send(b"{}")
        elif self.server.mode == "garbage":  # type: ignore[attr-defined]
            self._send(b"<html>502 bad gateway</html>")
        else:  # valid HTTP and JSON, but the content is not an answer
            self._send(json.dumps({"choices": [{"message": {"content": "phase two please"}}]}).encode())

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def broken_server(mode: str) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BrokenHandler)
    server.mode = mode  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_garbage_and_late_answers_are_errors_of_one_call():
    fmt = AnswerFormat("step", ("I1",), (2,), TIMING)
    with broken_server("garbage") as url:
        with pytest.raises(LLMCallError, match="not JSON") as err:
            HttpBackend(url, "default", timeout=5).chat(QUESTION, fmt, temperature=0, seed=0, max_tokens=10)
        assert not err.value.late
    with broken_server("slow") as url:
        backend = HttpBackend(url, "default", timeout=5)
        backend.timeout = 0.3
        with pytest.raises(LLMCallError) as err:
            backend.chat(QUESTION, fmt, temperature=0, seed=0, max_tokens=10)
        assert err.value.late


@pytest.mark.slow
def test_eval_with_a_server_answering_nonsense_holds_and_counts(reled, tmp_path):
    """A whole episode against a server whose answers never parse: it finishes, every call is counted."""
    with broken_server("nonsense") as url:
        proc = reled("eval", "--scenario", "grid2x2", "--controller", "llm", "--llm-mode", "step", "--llm-url", url,
                     "--seeds", "1", "--episode-seconds", "300", "--json", str(tmp_path / "eval.json"))
    assert proc.returncode == 0, proc.stderr
    assert "0% valid" in proc.stdout and "invalid" in proc.stdout
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["episodes"][0]["controller"] == "llm"


def test_eval_refuses_a_server_that_is_down(reled):
    proc = reled("eval", "--scenario", "grid2x2", "--controller", "llm", "--llm-url", f"http://127.0.0.1:{_free_port()}",
                 "--seeds", "1", "--episode-seconds", "60")
    assert proc.returncode == 2 and "not answering" in proc.stderr
