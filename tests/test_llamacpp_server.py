"""llama-cpp-python's own OpenAI-compatible server running pi_backend, through the thin launcher
(`python -m pi_backend.adapters.llamacpp.server ... --backend powerinfer`), driven by the `openai` client.

Each server is a subprocess on 127.0.0.1 (a free port), with bounded start-up and request timeouts, and
is stopped at the end. Answers are compared with the same model run in-process through the adapter.
The CLI server runs the PowerInfer file in oracle mode (exact), so requests evaluated in different
batches (the server reuses cached prefixes across requests) still give the in-process answers; the
config-file server also serves it in sparse mode.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

llama_cpp = pytest.importorskip("llama_cpp")
openai = pytest.importorskip("openai")
for _extra in ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings"):
    pytest.importorskip(_extra, reason="llama-cpp-python server extras")

import pi_backend.adapters.llamacpp  # noqa: E402,F401  (backend= on llama_cpp.Llama)
from pi_backend.adapters.llamacpp import server as launcher  # noqa: E402
from pi_backend.model.factory import write_llama_model  # noqa: E402

START_TIMEOUT = 120  # s, a loaded 2-core machine
REQUEST_TIMEOUT = 120
N_CTX = 256
PROMPTS = [f"{w} is the word that" for w in (
    "Apple", "Banana", "Cherry", "Delta", "Echo", "Falcon", "Garden", "Harbor",
    "Island", "Jungle", "Kettle", "Lantern", "Meadow", "Needle", "Orchard", "Pepper")]


class Server:
    def __init__(self, args, log_path, port=None):
        self.port = port or _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # settings also come from the environment (stock: MODEL, HOST, ...; ours: PI_BACKEND, PI_MODE, ...)
        for key in ("MODEL", "CONFIG_FILE", "HOST", "PORT", *map(launcher._env_name, launcher.PI_FIELDS)):
            env.pop(key, None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pi_backend.adapters.llamacpp.server", *args,
             *([] if port else ["--host", "127.0.0.1", "--port", str(self.port)])],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self):
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.base + "/v1/models", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not ready after {START_TIMEOUT} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-4000:]

    def client(self):
        return openai.OpenAI(base_url=self.base + "/v1", api_key="unused", timeout=REQUEST_TIMEOUT, max_retries=0)

    def post(self, path, body):
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as r:
            return json.loads(r.read())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("llamacpp_server")
    pwri = write_llama_model(d / "relu.powerinfer.gguf", n_embd=128, n_ff=512, n_layer=2, n_head=4,
                             ffn_act="reglu", powerinfer=True, predictor_rank=64, weight_type="f16", seed=2,
                             n_ctx=512)
    silu = write_llama_model(d / "silu-f32.gguf", n_embd=128, n_ff=320, n_layer=2, n_head=4, n_head_kv=2,
                             ffn_act="swiglu", weight_type="f32", record_ffn_act=False, seed=1, n_ctx=512)
    return {"pwri": str(pwri.path), "silu": str(silu.path), "dir": d}


COMMON = ["--n_ctx", str(N_CTX), "--n_threads", "1", "--n_threads_batch", "1", "--verbose", "false"]


@pytest.fixture(scope="module")
def server(models):
    s = Server(["--model", models["pwri"], "--model_alias", "pi-oracle", "--backend", "powerinfer",
                "--mode", "oracle", "--interrupt_requests", "false", *COMMON], models["dir"] / "cli-server.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local(models):
    """The same model in-process (the server's settings: logits_all=True)."""
    return llama_cpp.Llama(model_path=models["pwri"], backend="powerinfer", mode="oracle", n_ctx=N_CTX,
                           n_threads=1, verbose=False, logits_all=True)


def test_models_and_tokenize(server, local):
    ids = [m.id for m in server.client().models.list().data]
    assert ids == ["pi-oracle"]
    text = "Hello world, tokenized by llama.cpp's vocabulary"
    tokens = server.post("/extras/tokenize", {"input": text})["tokens"]
    assert tokens == local.tokenize(text.encode(), special=True) and len(tokens) > 5
    assert server.post("/extras/tokenize/count", {"input": text})["count"] == len(tokens)
    assert server.post("/extras/detokenize", {"tokens": tokens})["text"].strip() == text


def test_completion_chat_and_streaming(server, local):
    client = server.client()
    kw = dict(max_tokens=12, temperature=0.0)
    r = client.completions.create(model="pi-oracle", prompt=PROMPTS[0], **kw)
    expect = local.create_completion(PROMPTS[0], **kw)
    assert r.choices[0].text == expect["choices"][0]["text"] and r.usage.completion_tokens == 12
    assert r.choices[0].finish_reason == "length"
    # seeded sampling through the server: the sampler chain runs on our logits there too
    kw_s = dict(max_tokens=12, temperature=0.9, top_p=0.9, seed=17)
    r = client.completions.create(model="pi-oracle", prompt=PROMPTS[1], **kw_s)
    assert r.choices[0].text == local.create_completion(PROMPTS[1], **kw_s)["choices"][0]["text"]

    messages = [{"role": "user", "content": "Name three colours."}]
    c = client.chat.completions.create(model="pi-oracle", messages=messages, **kw)
    ref = local.create_chat_completion(messages=messages, **kw)
    assert c.choices[0].message.content == ref["choices"][0]["message"]["content"]
    assert c.choices[0].message.role == "assistant"

    chunks = list(client.completions.create(model="pi-oracle", prompt=PROMPTS[2], stream=True, **kw))
    full = local.create_completion(PROMPTS[2], **kw)["choices"][0]["text"]
    assert "".join(ch.choices[0].text for ch in chunks) == full and len(chunks) > 3
    assert chunks[-1].choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model="pi-oracle", messages=messages, stream=True, **kw)
    parts = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert "".join(parts) == ref["choices"][0]["message"]["content"]


def test_sixteen_concurrent_streaming_clients(server, local):
    kw = dict(max_tokens=8, temperature=0.0)
    expect = [local.create_completion(p, **kw)["choices"][0]["text"] for p in PROMPTS]
    results, errors = [None] * len(PROMPTS), []
    start = threading.Barrier(len(PROMPTS))

    def run(i):
        try:
            client = server.client()
            start.wait(timeout=30)
            chunks = list(client.completions.create(model="pi-oracle", prompt=PROMPTS[i], stream=True, **kw))
            results[i] = ("".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason)
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(f"client {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=REQUEST_TIMEOUT + 60)
    assert not errors and all(not t.is_alive() for t in threads), errors
    assert [r[1] for r in results] == ["length"] * len(PROMPTS)
    assert [r[0] for r in results] == expect


def test_config_file_selects_backend_per_model(models):
    """A multi-model config file: stock llama.cpp and pi_backend (sparse and dense) side by side."""
    port = _free_port()  # with a config file, host and port come from the file (as stock does)
    cfg = {"host": "127.0.0.1", "port": port, "interrupt_requests": False, "models": [
        {"model": models["pwri"], "model_alias": "pi-sparse", "backend": "powerinfer", **_cfg_common()},
        {"model": models["silu"], "model_alias": "stock", "backend": "llama.cpp", **_cfg_common()},
        {"model": models["silu"], "model_alias": "pi-dense", "backend": "powerinfer", "mode": "dense",
         **_cfg_common()},
    ]}
    path = models["dir"] / "models.json"
    path.write_text(json.dumps(cfg))
    s = Server(["--config_file", str(path)], models["dir"] / "config-server.log", port=port)
    try:
        client = s.client()
        assert sorted(m.id for m in client.models.list().data) == ["pi-dense", "pi-sparse", "stock"]
        kw = dict(max_tokens=16, temperature=0.0)
        sparse = client.completions.create(model="pi-sparse", prompt=PROMPTS[3], **kw).choices[0].text
        local = llama_cpp.Llama(model_path=models["pwri"], backend="powerinfer", n_ctx=N_CTX, n_threads=1,
                                verbose=False, logits_all=True)
        assert local._pi.mode == "sparse"
        assert sparse == local.create_completion(PROMPTS[3], **kw)["choices"][0]["text"]
        stock = client.completions.create(model="stock", prompt=PROMPTS[4], **kw).choices[0].text
        dense = client.completions.create(model="pi-dense", prompt=PROMPTS[4], **kw).choices[0].text
        assert dense == stock and len(stock) > 0  # pi_backend dense == llama.cpp on the same plain GGUF
    finally:
        s.stop()


def _cfg_common():
    return {"n_ctx": N_CTX, "n_threads": 1, "n_threads_batch": 1, "verbose": False}


def test_launcher_settings_and_errors(models, monkeypatch, capsys):
    monkeypatch.setenv("MODE", "bogus")  # generic names in the environment are not ours
    monkeypatch.delenv("PI_MODE", raising=False)
    sv, ms = launcher.parse_settings(["--model", models["pwri"], "--backend", "powerinfer", "--threshold", "0.5",
                                      "--port", "9"])
    assert sv.port == 9 and ms[0].backend == "powerinfer" and ms[0].mode is None
    assert launcher.llama_options(ms[0]) == {"backend": "powerinfer", "threshold": 0.5}
    monkeypatch.setenv("PI_MODE", "dense")
    assert launcher.parse_settings(["--model", models["pwri"], "--backend", "powerinfer"])[1][0].mode == "dense"
    monkeypatch.delenv("PI_MODE")
    _, ms = launcher.parse_settings(["--model", models["pwri"], "--backend", "powerinfer", "--mode", "sparse",
                                     "--pi_options", '{"threshold": 1.5, "mode": "dense"}'])
    # the dedicated flags win over the same key in --pi_options
    assert launcher.llama_options(ms[0]) == {"backend": "powerinfer", "mode": "sparse", "threshold": 1.5}
    monkeypatch.setenv("PI_OPTIONS", '{"bogus_option": 1}')
    _, ms = launcher.parse_settings(["--model", models["pwri"], "--backend", "powerinfer"])
    with pytest.raises(ValueError, match="unknown pi_backend option.*bogus_option"):
        launcher.llama_options(ms[0])
    monkeypatch.delenv("PI_OPTIONS")
    _, ms = launcher.parse_settings(["--model", models["silu"]])
    assert ms[0].backend == "llama.cpp" and launcher.llama_options(ms[0]) == {}
    _, ms = launcher.parse_settings(["--model", models["silu"], "--mode", "dense"])
    with pytest.raises(ValueError, match="need backend powerinfer"):
        launcher.llama_options(ms[0])
    assert launcher.main(["--model", models["silu"], "--backend", "vllm"]) == 2
    assert "backend" in capsys.readouterr().err
    # the wrapped stock loader builds our model from settings (no server needed)
    from llama_cpp.server.model import LlamaProxy

    launcher.install_server_hook()
    launcher.install_server_hook()  # idempotent
    _, ms = launcher.parse_settings(["--model", models["pwri"], "--backend", "powerinfer", "--mode", "oracle",
                                     *COMMON])
    llm = LlamaProxy.load_llama_from_model_settings(ms[0])
    assert type(llm).__name__ == "PowerInferLlama" and llm._pi.mode == "oracle" and llm.n_ctx() == N_CTX
    _, ms = launcher.parse_settings(["--model", models["silu"], *COMMON])
    assert type(LlamaProxy.load_llama_from_model_settings(ms[0])) is llama_cpp.Llama
