"""Served models measured over HTTP (runtimes/endpoint.py): llama-cpp-python's real server on
GGUFs of the bundled model (echo + logprobs, text prompts), and vLLM's ``prompt_logprobs``
shape (token-id prompts) replayed by a small local server, since no vLLM runs here."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pty
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from pytest_hemorrhage.budget import Budget
from pytest_hemorrhage.chat import BUNDLED_CHAT
from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.runtimes.endpoint import (
    API_KEY_ENV,
    Endpoint,
    check_reachable,
    public_url,
)

# -- a real server: llama-cpp-python's, on a free port ------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _llama_servers(paths, folder):
    """llama-cpp-python's OpenAI-compatible server on each of ``paths`` (started together),
    each ready when its ``/v1/models`` answers; stopped by their PIDs; their logs printed at
    teardown (pytest shows them on failure)."""
    started = []
    try:
        for path in paths:
            port, log = _free_port(), folder / f"{path.stem}.log"
            with open(log, "w") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "llama_cpp.server", "--model", str(path)]
                    + ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            started.append((process, f"http://127.0.0.1:{port}/v1", log))
        deadline = time.monotonic() + 60
        for process, url, log in started:
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"llama-cpp-python's server did not start:\n{log.read_text()}")
                try:
                    urllib.request.urlopen(url + "/models", timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.2)
        yield [url for _, url, _ in started]
    finally:
        for process, _, log in started:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            print(f"--- llama-cpp-python server log ({log.name}) ---\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    """Two servers (the float file and Q4_0) and the windows both tokenize as the reference
    does, each led by the BOS token (without it llama-cpp-python's server shifts the
    log-probs by one position)."""
    pytest.importorskip("llama_cpp.server", reason="needs llama-cpp-python[server]")
    from pytest_hemorrhage.modifications.quant.gguf import Gguf
    from pytest_hemorrhage.modifications.quant.gguf.export import write_gguf

    folder = tmp_path_factory.mktemp("served")
    f32 = write_gguf(tiny.model, tiny.tokenizer, folder / "f32.gguf")
    q4 = write_gguf(tiny.model, tiny.tokenizer, folder / "q4_0.gguf", Gguf(type="Q4_0"))
    with _llama_servers([f32, q4], folder) as (f32_url, q4_url):
        yield {"f32": (f32, f32_url), "q4_0": (q4, q4_url)}


def _server_tokens(url, text):
    request = urllib.request.Request(
        url.removesuffix("/v1") + "/extras/tokenize",
        json.dumps({"input": text}).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as response:
        return json.load(response)["tokens"]


def _harness_on(make_harness, tiny, rows):
    harness = make_harness(tiny, tokens=2048)
    harness.windows = dataclasses.replace(harness.windows, eval=torch.tensor(rows))
    return harness


@pytest.fixture(scope="module")
def windows(tiny, make_harness, served):
    """Eval windows (BOS-led, and as they are) that the server tokenizes to the same ids; and
    one it tokenizes differently (llama.cpp's pre-tokenizer splits ' (' where HF's does not)."""
    _, url = served["f32"]
    rows = make_harness(tiny, tokens=2048).windows.eval.tolist()
    decode = tiny.tokenizer.decode
    bos = [[tiny.tokenizer.bos_token_id] + w[:-1] for w in rows]
    same = [w for w in bos if _server_tokens(url, decode(w)) == w]
    plain = [w for w in rows if _server_tokens(url, decode(w)) == w]
    other = next(w for w in rows if _server_tokens(url, decode(w)) != w)
    assert len(same) >= 4 and len(plain) >= 4
    return {"bos": same[:4], "plain": plain[:4], "other": other}


def test_the_float_file_served_measures_at_the_noise_floor(served, windows, tiny, make_harness):
    harness = _harness_on(make_harness, tiny, windows["bos"])
    result = harness.measure_endpoint(Endpoint(served["f32"][1], tiny.tokenizer), {})
    # llama.cpp's F16 KV cache and its sums: not 0, far below any quantization
    assert 0 <= result.metrics["kl_mean"] < 2e-5
    assert abs(result.metrics["ppl_increase"]) < 1e-3
    assert result.metrics["top1_disagreement"] == 0
    import llama_cpp

    assert result.details["runtime"] == {
        "name": "endpoint",
        "url": served["f32"][1],
        "protocol": "echo",
        "model": str(served["f32"][0]),
        "logprobs": 20,
        # what llama-cpp-python's server says it is (its FastAPI schema)
        "server": f"llama.cpp Python API {llama_cpp.__version__}",
    }
    bound = result.details["kl_bound"]
    assert not bound["exact"] and bound["interval"]["kl_mean"][1] is None
    # the server is deterministic: repeated requests agree bit for bit
    assert result.details["noise_floor"]["max_abs_logprob_diff"] == 0
    # the first token after BOS gets no log-prob from echo (OpenAI's null first entry)
    assert result.tokens == 4 * 126 and result.details["unscored"] == 4
    # damage by position: the buckets count the scored tokens (not position 1's, unscored)
    assert [b["positions"] for b in result.positions] == [[1, 16], [16, 64], [64, 128]]
    assert [b["tokens"] for b in result.positions] == [4 * 14, 4 * 48, 4 * 64]


def test_q4_0_served_measures_what_llama_cpp_measures_in_process(
    served, windows, tiny, make_harness
):
    """Tolerance: per position, the served log-prob of every token is llama.cpp's in-process
    one within 1e-4 nats (the server runs other thread and batch counts); ppl_increase within
    1%; the served KL (top-20, a lower bound) within [0.6, 1.01] x the in-process exact KL on
    the same positions."""
    from pytest_hemorrhage.runtimes.llama_cpp import LlamaCppModel

    path, url = served["q4_0"]
    harness = _harness_on(make_harness, tiny, windows["bos"])
    endpoint = Endpoint(url, tiny.tokenizer)
    result = harness.measure_endpoint(endpoint, {})
    local = LlamaCppModel(path, 128, threads=1)
    ids = torch.tensor(windows["bos"])
    logp = torch.log_softmax(local(ids), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    got = torch.tensor([w.target_logp for w in endpoint.score(windows["bos"])])
    assert got[:, 0].isnan().all()  # position 1 after BOS: none returned
    assert (got[:, 1:] - logp[:, 1:]).abs().max() < 1e-4
    nll = -logp[:, 1:].double().mean()
    base = -harness.reference.target_logp.view(4, 127)[:, 1:].double().mean()
    in_process = math.expm1(nll - base)
    assert result.metrics["ppl_increase"] == pytest.approx(in_process, rel=0.01)
    assert result.metrics["ppl_increase"] > 0.01  # it did measure Q4_0's damage
    # the exact KL of the file in-process, over the same positions, from the full reference
    p = harness.reference.p.view(4, 127, -1)[:, 1:].double()
    logq = torch.log_softmax(local(ids).double(), -1)[:, :-1][:, 1:]
    exact = (p * (p.clamp_min(1e-300).log() - logq)).sum(-1).mean().item()
    assert 0.6 * exact < result.metrics["kl_mean"] <= 1.01 * exact


def test_windows_without_bos_are_named_as_shifted(served, windows, tiny, make_harness):
    harness = _harness_on(make_harness, tiny, windows["plain"])
    with pytest.raises(HemorrhageError, match="shifted by one position") as caught:
        harness.measure_endpoint(Endpoint(served["f32"][1], tiny.tokenizer), {})
    assert "\n" not in str(caught.value) and "BOS" in str(caught.value)


def test_a_tokenization_difference_names_the_first_differing_token(
    served, windows, tiny, make_harness
):
    harness = _harness_on(make_harness, tiny, [windows["other"]])
    with pytest.raises(HemorrhageError, match=r"differ from the reference's at position \d+: "):
        harness.measure_endpoint(Endpoint(served["f32"][1], tiny.tokenizer), {})


def test_a_kl_budget_under_confidence_is_refused_on_a_lower_bound(
    served, windows, tiny, make_harness
):
    harness = _harness_on(make_harness, tiny, windows["bos"][:2])
    endpoint = Endpoint(served["f32"][1], tiny.tokenizer)
    with pytest.raises(HemorrhageError, match="kl_mean under confidence.*only a lower bound"):
        harness.measure_endpoint(endpoint, {}, Budget({"kl_mean": 1.0}, confidence=0.95))
    # exact metrics are fine under confidence
    budget = Budget({"ppl_increase": 0.01}, confidence=0.95)
    assert not harness.measure_endpoint(endpoint, {}, budget).violations(budget)


# -- vLLM's prompt_logprobs shape, replayed --------------------------------------------------


class _Replay:
    """A local server answering ``/v1/models`` and ``/v1/completions`` as vLLM does, its
    log-probs computed by ``logits(ids)``; ``fail`` answers the next requests with an error.
    With ``version``, ``GET /version`` answers as vLLM's does; with ``render`` (messages ->
    the rendered text), ``POST /tokenize`` with ``messages`` answers as vLLM's does, or, with
    ``apply_template`` set, ``POST /apply-template`` as llama.cpp's llama-server does. Any
    other path is FastAPI's 404."""

    def __init__(self, logits):
        self.logits = logits
        self.requests: list[tuple[str, dict, dict]] = []
        self.fail: list[tuple[int, str]] = []
        self.version: str | None = None
        self.render = None
        self.apply_template = False
        self.delay, self.in_flight, self.most_in_flight = 0.0, 0, 0
        lock = threading.Lock()
        replay = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    models = [{"id": "tiny", "object": "model"}]
                    self._send(200, {"object": "list", "data": models})
                elif self.path == "/version" and replay.version:
                    self._send(200, {"version": replay.version})
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                replay.requests.append((self.path, dict(self.headers), body))
                if self.path != "/v1/completions":
                    self._send(*replay.other(self.path, body))
                    return
                with lock:
                    replay.in_flight += 1
                    replay.most_in_flight = max(replay.most_in_flight, replay.in_flight)
                time.sleep(replay.delay)
                try:
                    self._answer(body)
                finally:
                    with lock:
                        replay.in_flight -= 1

            def _answer(self, body):
                if replay.fail:
                    self._send(*replay.fail.pop(0))
                    return
                if not isinstance(body["prompt"], list):
                    self._send(400, {"error": {"message": "this replay takes token ids"}})
                    return
                self._send(200, replay.response(body))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def response(self, body):
        """vLLM's /v1/completions answer (recorded shape, vLLM 0.6-0.10): ``prompt_logprobs``
        has one entry per prompt token, the first null, each a dict keyed by the token id as a
        string, holding the top-k and the actual token (so k or k + 1 entries)."""
        ids, k = body["prompt"], body["prompt_logprobs"]
        logp = torch.log_softmax(self.logits(torch.tensor([ids]))[0].double(), -1)
        rows = [None]
        for position in range(1, len(ids)):
            row = logp[position - 1]
            top = row.topk(k)
            picked = dict(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            picked.setdefault(ids[position], row[ids[position]].item())
            rank = (row > row[ids[position]]).sum().item() + 1
            ranks = {i: 1 + r for r, i in enumerate(picked)} | {ids[position]: rank}
            rows.append(
                {
                    str(i): {"logprob": v, "rank": ranks[i], "decoded_token": "x"}
                    for i, v in picked.items()
                }
            )
        return {
            "id": "cmpl-1",
            "object": "text_completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "text": "x",
                    "logprobs": None,
                    "finish_reason": "length",
                    "prompt_logprobs": rows,
                }
            ],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": 1},
        }

    def other(self, path, body):
        """vLLM's ``/tokenize`` with messages (recorded shape, vLLM 0.8-0.10: the rendered
        template's ids, tokenized without special tokens, as vLLM does by default for chat);
        llama-server's ``/apply-template`` (``{"prompt": text}``)."""
        if self.render is not None and "messages" in body:
            if path == "/apply-template" and self.apply_template:
                return 200, {"prompt": self.render(body["messages"])}
            if path == "/tokenize" and not self.apply_template:
                assert body["add_generation_prompt"] is False and body["model"] == "tiny"
                text = self.render(body["messages"])
                ids = self.tokenizer(text, add_special_tokens=body["add_special_tokens"])
                tokens = ids["input_ids"]
                return 200, {
                    "count": len(tokens),
                    "max_model_len": 2048,
                    "tokens": tokens,
                    "token_strs": None,
                }
        return 404, {"detail": "Not Found"}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def small(tiny, make_harness):
    """Four windows: enough for every check of the protocol, fast with k = 512."""
    return make_harness(tiny, tokens=512)


@pytest.fixture
def replay(tiny):
    def logits(ids):
        with torch.inference_mode():
            return tiny.model(ids).logits

    server = _Replay(logits)
    server.tokenizer = tiny.tokenizer
    yield server
    server.close()


def test_vllm_prompt_logprobs_covering_the_vocabulary_give_the_exact_kl(replay, tiny, small):
    replay.version = "0.10.1.1"
    endpoint = Endpoint(replay.url, tiny.tokenizer, logprobs=len(tiny.tokenizer))
    result = small.measure_endpoint(endpoint, {"label": "vllm"})
    assert endpoint.protocol == "prompt_logprobs" and endpoint.model == "tiny"
    assert result.details["runtime"]["server"] == "0.10.1.1"  # vLLM's GET /version
    # damage by position: every position scored, bucket by bucket
    assert [b["tokens"] for b in result.positions] == [4 * 15, 4 * 48, 4 * 64]
    weighted = sum(b["metrics"]["top1_disagreement"] * b["tokens"] for b in result.positions)
    assert weighted / result.tokens == pytest.approx(result.metrics["top1_disagreement"])
    assert result.details["kl_bound"]["exact"]
    assert result.metrics["kl_mean"] < 1e-6 and result.metrics["top1_disagreement"] == 0
    assert result.tokens == small.reference.targets.numel()  # every position scored
    path, _, body = replay.requests[0]
    assert path == "/v1/completions" and body["prompt"] == small.windows.eval[0].tolist()
    assert body["max_tokens"] == 1 and body["prompt_logprobs"] == 512


def _damaged(tiny, seed: int) -> _Replay:
    """A vLLM-shaped server of the bundled model with seeded noise on its logits (the same
    per token id at every position)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(tiny.tokenizer), generator=g) * 0.5

    def logits(ids):
        with torch.inference_mode():
            return tiny.model(ids).logits + noise

    return _Replay(logits)


def test_a_damaged_served_model_reads_a_lower_bound_below_the_exact_kl(tiny, small):
    server = _damaged(tiny, 0)
    try:
        exact = small.measure_endpoint(Endpoint(server.url, tiny.tokenizer, logprobs=512), {})
        low = small.measure_endpoint(Endpoint(server.url, tiny.tokenizer, logprobs=5), {})
    finally:
        server.close()
    assert exact.details["kl_bound"]["exact"] and not low.details["kl_bound"]["exact"]
    assert 0 < low.metrics["kl_mean"] < exact.metrics["kl_mean"]
    # the exact metrics do not depend on k
    assert low.metrics["ppl_increase"] == pytest.approx(exact.metrics["ppl_increase"], abs=1e-9)
    assert low.metrics["top1_disagreement"] == exact.metrics["top1_disagreement"]


def test_top_k_storage_gives_a_lower_bound_never_called_exact(tiny, make_harness):
    """With a reference that keeps only the baseline's top 16 per token, even a server returning
    every id gives a lower bound: the rest of the baseline's distribution is not known."""
    topk = make_harness(tiny, tokens=512, topk=16)
    exact = make_harness(tiny, tokens=512)
    server = _damaged(tiny, 1)
    try:
        low = topk.measure_endpoint(Endpoint(server.url, tiny.tokenizer, logprobs=512), {})
        full = exact.measure_endpoint(Endpoint(server.url, tiny.tokenizer, logprobs=512), {})
    finally:
        server.close()
    assert full.details["kl_bound"]["exact"] and not low.details["kl_bound"]["exact"]
    assert 0.5 * full.metrics["kl_mean"] < low.metrics["kl_mean"] <= full.metrics["kl_mean"]


def test_a_nondeterministic_server_shows_its_noise_floor_and_a_budget_inside_it_warns(tiny, small):
    g = torch.Generator().manual_seed(2)

    def logits(ids):  # each request its own small jitter, as batch-variant kernels give
        with torch.inference_mode():
            return tiny.model(ids).logits + 1e-3 * torch.randn(ids.shape[1], 512, generator=g)

    server = _Replay(logits)
    try:
        endpoint = Endpoint(server.url, tiny.tokenizer, concurrency=1)
        with pytest.warns(UserWarning, match=r"ppl_increase budget 0.001 is within 3x"):
            result = small.measure_endpoint(endpoint, {}, Budget({"ppl_increase": 0.001}))
        floor = result.details["noise_floor"]
        assert floor["windows"] == 2 and 1e-4 < floor["mean_abs_logprob_diff"] < 1e-2
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a budget well above the noise: no warning
            small.measure_endpoint(endpoint, {}, Budget({"ppl_increase": 0.05}))
    finally:
        server.close()


def test_a_missing_position_stops_the_measure(replay, tiny, small):
    """A partly scored measure is never a pass: a row without the prompt token's own entry."""
    respond = replay.response

    def dropping(body):
        out = respond(body)
        row = out["choices"][0]["prompt_logprobs"][5]
        row.pop(str(body["prompt"][5]), None)
        return out

    replay.response = dropping
    with pytest.raises(HemorrhageError, match="no log-prob for prompt token 5 ") as caught:
        small.measure_endpoint(Endpoint(replay.url, tiny.tokenizer), {})
    assert "\n" not in str(caught.value)


def test_a_500_after_retries_names_the_status_and_the_body_s_first_line(replay, tiny, small):
    replay.fail = [(500, "boom: the engine died\nTraceback ...")] * 100
    endpoint = Endpoint(
        replay.url, tiny.tokenizer, protocol="prompt_logprobs", retries=2, backoff=0.01
    )
    with pytest.raises(HemorrhageError) as caught:
        small.measure_endpoint(endpoint, {})
    assert str(caught.value) == (
        f"{replay.url}/completions: HTTP 500 after 3 tries: boom: the engine died"
    )


def test_429_is_retried_with_backoff(replay, tiny, small):
    replay.fail = [(429, "slow down"), (503, "busy")]
    endpoint = Endpoint(replay.url, tiny.tokenizer, protocol="prompt_logprobs", backoff=0.01)
    result = small.measure_endpoint(endpoint, {})
    assert result.metrics["top1_disagreement"] == 0
    assert len(replay.requests) == len(small.windows.eval) + 2 + 2  # + retries + noise floor


@pytest.mark.parametrize("concurrency", [1, 3])
def test_requests_in_flight_are_the_concurrency_asked(replay, tiny, small, concurrency):
    replay.delay = 0.1
    endpoint = Endpoint(replay.url, tiny.tokenizer, concurrency=concurrency)
    small.measure_endpoint(endpoint, {})
    assert replay.most_in_flight == concurrency


def test_the_api_key_is_sent_and_never_reported(replay, tiny, small, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "sk-secret-123")
    result = small.measure_endpoint(Endpoint(replay.url, tiny.tokenizer), {})
    assert all(h.get("Authorization") == "Bearer sk-secret-123" for _, h, _ in replay.requests)
    assert "sk-secret" not in json.dumps(result.to_dict())


def test_an_unreachable_url_is_one_line():
    url = f"http://127.0.0.1:{_free_port()}/v1"
    with pytest.raises(HemorrhageError, match="no server answers there") as caught:
        check_reachable(url)
    assert "\n" not in str(caught.value)


def test_an_endpoint_candidate_through_pytest(pytester, replay):
    pytester.makepyfile(
        """
        def test_gate(hemorrhage, hemorrhage_candidate):
            result = hemorrhage.measure_model(hemorrhage_candidate)
            runtime = result.details["runtime"]
            exact = result.details["kl_bound"]["exact"]
            print("RUNTIME", runtime["name"], runtime["logprobs"], exact, result.metrics["kl_mean"])
        """
    )
    base = ("--hemorrhage-model=hemorrhage-tiny", "--hemorrhage-tokens=256", "-s")
    saved = pytester.path / "tiny.ref"
    # options after '#' (never sent to the server): the whole vocabulary, so KL is exact
    spec = f"{replay.url}#logprobs=512&model=my-llama"
    result = pytester.runpytest(
        *base, f"--hemorrhage-candidate={spec}", f"--hemorrhage-save-reference={saved}"
    )
    result.assert_outcomes(passed=1)
    line = next(x for x in result.outlines if "RUNTIME " in x)
    assert line.split("RUNTIME ")[1].split()[:3] == ["endpoint", "512", "True"]
    assert all(body["model"] == "my-llama" for _, _, body in replay.requests)
    # with the reference file alone (no baseline model, no tokenizer): token-id prompts
    alone = pytester.runpytest(
        f"--hemorrhage-reference={saved}",
        "--hemorrhage-tokens=256",
        f"--hemorrhage-candidate={spec}",
        "-s",
    )
    alone.assert_outcomes(passed=1)
    assert next(x for x in alone.outlines if "RUNTIME " in x) == line
    # a URL no server answers: a usage error at startup, one line
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    result = pytester.runpytest(*base, f"--hemorrhage-candidate={dead}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [x for x in result.errlines if "no server answers there" in x]
    assert len(errors) == 1 and dead in errors[0]
    result = pytester.runpytest(*base, f"--hemorrhage-candidate={replay.url}#top=5")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert any("unknown option 'top' after '#'" in x for x in result.errlines)


# -- the coarsened KL, by hand ------------------------------------------------------------------


def _one_row(p, q, returned):
    """A reference of one token with probabilities ``p`` and a server's answer for it: the
    log-probs of ``q`` at the ``returned`` ids."""
    from pytest_hemorrhage.reference import Reference
    from pytest_hemorrhage.runtimes.endpoint import WindowScores

    p, q = torch.tensor(p, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)
    reference = Reference(
        targets=torch.tensor([0]),
        target_logp=p[:1].log().float(),
        top1=p.argmax()[None],
        p=p[None].float(),
    )
    served = WindowScores(
        [q[0].log().item()], [list(returned)], [q[list(returned)].log().tolist()], [(0,)]
    )
    true_kl = (p * (p / q).log()).sum().item()
    return reference, served, true_kl


def test_the_kl_is_the_coarsened_one_a_lower_bound_exact_over_the_whole_vocabulary():
    from pytest_hemorrhage.runtimes.endpoint import score_windows

    p, q = [0.5, 0.3, 0.1, 0.1], [0.4, 0.2, 0.3, 0.1]
    reference, served, true_kl = _one_row(p, q, [0, 1])
    got = score_windows([served], reference, 4)
    # the returned ids and one bucket for the rest (ids 2 and 3: p 0.2, q 0.4)
    by_hand = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.4)
    assert got.kl.item() == pytest.approx(by_hand, rel=1e-6)
    assert 0 < got.kl.item() < true_kl and not got.exact and got.returned == 2
    reference, served, true_kl = _one_row(p, q, [0, 1, 2, 3])
    got = score_windows([served], reference, 4)
    assert got.exact and got.kl.item() == pytest.approx(true_kl, rel=1e-6)


# -- the served chat template, the server's version, the report's candidates ----------------


@pytest.fixture(scope="module")
def chat(tiny, make_harness):
    """Chat data: the bundled conversations rendered by the bundled chat template."""
    return make_harness(tiny, data=BUNDLED_CHAT, tokens=512)


def _template(tokenizer, source=None):
    def render(messages):
        return tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False)

    return render


@pytest.mark.parametrize("form", ["vllm /tokenize", "llama-server /apply-template"])
def test_the_server_s_chat_template_is_compared_token_by_token(replay, tiny, chat, form):
    """The server's rendering (vLLM: token ids; llama-server: text) against the baseline's,
    once per measure with chat data: the same template reads "same"; one that writes the
    roles in capitals names the first token that differs, and where."""
    replay.apply_template = form.startswith("llama-server")
    replay.render = _template(tiny.tokenizer)
    result = chat.measure_endpoint(Endpoint(replay.url, tiny.tokenizer), {})
    assert result.details["chat_template"] == "same"
    # every conversation measured, each once (llama-server's form is tried first, once)
    rendered = [p for p, _, _ in replay.requests if p in ("/tokenize", "/apply-template")]
    probe = [] if replay.apply_template else ["/apply-template"]
    assert rendered == probe + [form.split()[1]] * chat.windows.details["conversations"]
    upper = tiny.tokenizer.chat_template.replace(
        "message.role | capitalize", "message.role | upper"
    )
    replay.render = _template(tiny.tokenizer, upper)
    result = chat.measure_endpoint(Endpoint(replay.url, tiny.tokenizer), {})
    # the bundled tokenizer writes "System:" as 'S' 'y' ..., "SYSTEM:" as 'S' 'Y' ...
    where = f"{BUNDLED_CHAT}:1"
    assert result.details["chat_template"] == f"differs at token 2: 'y' vs 'Y' ({where})"


def test_a_server_without_a_rendered_prompt_says_so(replay, tiny, chat, small, served):
    """llama-cpp-python's real server exposes no rendering (its routes have none); nor does
    a vLLM-shaped server that answers /tokenize with 404. Without chat data nothing is asked."""
    real = Endpoint(served["f32"][1], tiny.tokenizer)
    assert real.chat_template(tiny.tokenizer, BUNDLED_CHAT, 2) == "not exposed by this server"
    result = chat.measure_endpoint(Endpoint(replay.url, tiny.tokenizer), {})
    assert result.details["chat_template"] == "not exposed by this server"
    replay.requests.clear()
    assert (
        "chat_template"
        not in small.measure_endpoint(Endpoint(replay.url, tiny.tokenizer), {}).details
    )
    assert all(p == "/v1/completions" for p, _, _ in replay.requests)


def test_a_report_shows_the_url_without_credentials():
    url = "https://user:pw@gpu-box.internal:8443/v1?api_key=sk-1#model=llama"
    assert public_url(url) == "https://gpu-box.internal:8443/v1"
    assert public_url("http://[::1]:8000/v1") == "http://[::1]:8000/v1"


def test_the_report_lists_the_endpoint_among_candidates_never_its_key(
    pytester, replay, monkeypatch
):
    monkeypatch.setenv(API_KEY_ENV, "sk-secret-123")
    replay.version = "0.10.1.1"
    pytester.makepyfile(
        """
        def test_gate(hemorrhage, hemorrhage_candidate):
            hemorrhage.measure_model(hemorrhage_candidate)
        """
    )
    report = pytester.path / "report.json"
    spec = f"{replay.url}#model=tiny"
    result = pytester.runpytest(
        "--hemorrhage-model=hemorrhage-tiny",
        "--hemorrhage-tokens=256",
        f"--hemorrhage-candidate={spec}",
        f"--hemorrhage-report={report}",
    )
    result.assert_outcomes(passed=1)
    text = report.read_text()
    assert "sk-secret" not in text
    [entry] = json.loads(text)["candidates"]
    assert entry["label"] == spec and entry["spec"] == replay.url
    assert entry["endpoint"] == {
        "url": replay.url,
        "model": "tiny",
        "protocol": "prompt_logprobs",
        "server": "0.10.1.1",
        "logprobs": 20,
    }
    assert entry["noise_floor"]["windows"] == 2
    assert entry["noise_floor"]["max_abs_logprob_diff"] == 0  # the replay is deterministic
    # output that is not a terminal (a CI log): no progress bar
    assert not any("req/s" in line for line in result.outlines + result.errlines)


@contextlib.contextmanager
def _terminal(monkeypatch):
    """stderr a pseudo-terminal, as a user's shell gives pytest; yields what was written to
    it so far (read on a thread, so the terminal never fills)."""
    leader, follower = pty.openpty()
    tty = os.fdopen(follower, "w")
    monkeypatch.setattr(sys, "__stderr__", tty)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.delenv("NO_COLOR", raising=False)
    chunks: list[bytes] = []

    def read():
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the other end closed
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield lambda: b"".join(chunks).decode("utf-8", "replace")
    finally:
        tty.close()
        reader.join(5)
        os.close(leader)


def test_a_progress_bar_counts_the_requests_on_a_terminal_only(pytester, replay, monkeypatch):
    """On a terminal, a slow server's measure shows requests done of the total (4 windows
    and 2 repeated for the noise floor) and their rate; under -p no:terminal, nothing."""
    replay.delay = 0.4
    pytester.makepyfile(
        """
        def test_gate(hemorrhage, hemorrhage_candidate):
            hemorrhage.measure_model(hemorrhage_candidate)
        """
    )
    args = [
        "--hemorrhage-model=hemorrhage-tiny",
        "--hemorrhage-tokens=512",
        f"--hemorrhage-candidate={replay.url}#concurrency=1",
    ]
    with _terminal(monkeypatch) as shown:
        pytester.runpytest(*args).assert_outcomes(passed=1)
        time.sleep(0.2)
        assert "/6" in shown() and re.search(r"\d+\.\d req/s", shown()), shown()
        assert "127.0.0.1" in shown()  # the bar names the server
        before = shown()
        result = pytester.runpytest(*args, "-p", "no:terminal")
        assert result.ret == 0
        time.sleep(0.2)
        assert shown() == before
