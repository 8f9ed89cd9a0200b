"""Scoring a served model (runtimes/endpoint.py) against a bare client loop sending the same
requests to the same server, side by side in one run (issue 21's target: <= 1.25x).

The server: llama-cpp-python's, on a float GGUF of the bundled model, started here on a free
127.0.0.1 port. The requests: the echo + logprobs form, one per evaluation window (led by BOS,
which that server needs; the windows it tokenizes as the reference does), plus the noise floor's
repeats; the bare loop posts the same bodies with ``concurrency`` threads and parses the JSON,
nothing else. The measure adds the token checks, the per-position scoring and the metrics.

Run: python benchmarks/bench_endpoint.py [--logprobs K ...]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import side_by_side

TARGET = 1.25


def _serve(path: Path, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--host"]
            + ["127.0.0.1", "--port", str(port), "--n_ctx", "512", "--verbose", "false"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/models", timeout=1).close()
            return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the server did not start:\n{log.read_text()}")
            time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--logprobs", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import dataclasses

    import torch

    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import load_model
    from pytest_hemorrhage.modifications.quant.gguf.export import write_gguf
    from pytest_hemorrhage.runtimes.endpoint import NOISE_WINDOWS, Endpoint, token_strings
    from pytest_hemorrhage.settings import Settings

    torch.set_num_threads(1)
    loaded = load_model("hemorrhage-tiny", device="cpu")
    tokenizer = loaded.tokenizer
    harness = Harness(loaded, Settings.defaults(model=loaded.spec, tokens=args.tokens))
    folder = Path(tempfile.mkdtemp())
    process, url = _serve(write_gguf(loaded.model, tokenizer, folder / "f32.gguf"), folder / "log")
    failed = False
    try:
        rows = [[tokenizer.bos_token_id] + w[:-1] for w in harness.windows.eval.tolist()]
        probe = Endpoint(url, tokenizer, protocol="echo")
        strings = token_strings(tokenizer)

        def same(ids: list[int]) -> bool:  # the server's tokens are the reference's
            data = json.dumps(probe.body(ids) | {"logprobs": 1}).encode()
            request = urllib.request.Request(
                url + "/completions", data, {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request) as response:
                tokens = json.load(response)["choices"][0]["logprobs"]["tokens"]
            return tokens[: len(ids) - 1] == [strings[i] for i in ids[1:]]

        rows = [w for w in rows if same(w)]
        harness.windows = dataclasses.replace(harness.windows, eval=torch.tensor(rows))
        harness.reference  # noqa: B018  computed once, outside the timing
        print(f"{len(rows)} windows of {len(rows[0])} tokens, server {url}")
        for k in args.logprobs:
            endpoint = Endpoint(url, tokenizer, protocol="echo", logprobs=k)
            bodies = [endpoint.body(w) for w in rows + rows[:NOISE_WINDOWS]]

            def bare(endpoint: Endpoint = endpoint, bodies: list = bodies) -> None:
                def one(body: dict) -> None:
                    request = urllib.request.Request(
                        endpoint.url + "/completions",
                        json.dumps(body).encode(),
                        {"Content-Type": "application/json"},
                    )
                    with urllib.request.urlopen(request) as response:
                        json.load(response)

                with ThreadPoolExecutor(endpoint.concurrency) as pool:
                    list(pool.map(one, bodies))

            def measure(endpoint: Endpoint = endpoint) -> None:
                harness.measure_endpoint(endpoint, {})

            rounds = side_by_side({"bare": bare, "measure": measure}, args.rounds)
            ratio = rounds.ratio("measure", "bare")
            ok = ratio <= TARGET
            failed |= not ok
            print(
                f"logprobs={k:4d}: bare {rounds.median('bare'):.3f} s, measure "
                f"{rounds.median('measure'):.3f} s, ratio {ratio:.2f}x "
                f"(target <= {TARGET}x) {'ok' if ok else 'OVER'}"
            )
    finally:
        process.terminate()
        process.wait(10)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
