"""A served model measured over HTTP: an OpenAI-compatible server's prompt log-probabilities
scored against the baseline's reference.

Two protocols, chosen per server (``protocol="auto"`` tries the first, falls back to the second):

- ``prompt_logprobs`` (vLLM, and servers that copy it): ``POST /completions`` with the window's
  token ids as the prompt, ``max_tokens: 1`` and ``prompt_logprobs: k``; each position returns
  the actual token's log-prob and the top-k, keyed by token id. The ids are the reference's,
  so nothing is re-tokenized.
- ``echo`` (the OpenAI legacy form, llama-cpp-python's server): the window's text with
  ``echo: true, logprobs: k, max_tokens: 1``; entries are keyed by token *text*. The server's
  tokens must be the reference's, position by position (the first differing one is named);
  top-k keys that several ids decode to are left in the unreturned bucket.

What the numbers are: the actual token's log-prob gives nll_increase and ppl_increase exactly;
top-1 is the top entry. KL is not: only k of the vocabulary's probabilities come back. The KL
of the coarsened distributions (the returned ids, each its own outcome, and one bucket for the
rest) is a lower bound of the true KL (the data-processing inequality: merging outcomes never
raises KL), and it is exact when the returned ids cover the vocabulary. No finite upper bound
exists without an assumption on how the unreturned mass is spread (the modified model may put
its tail mass on tokens where the baseline's is tiny, making KL arbitrarily large), so a KL
budget under ``confidence`` is refused unless the KL is exact.

An API key is read from ``HEMORRHAGE_API_KEY`` and sent as a bearer token; it is never part of
:meth:`Endpoint.describe`, an error or a report, nor is a user name or password in the URL.

With chat data, the server's own rendering of a conversation is compared with the baseline's
(:meth:`Endpoint.chat_template`) where the server exposes it: vLLM's ``POST /tokenize`` with
``messages`` (the rendered template's token ids) and llama.cpp's ``POST /apply-template`` (its
text, tokenized by the baseline). The measure itself sends the baseline's rendering, so a
difference does not move the metrics: it says the server's users are sent other prompts.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING, Any

from ..errors import HemorrhageError, first_line

if TYPE_CHECKING:
    from pathlib import Path

    from ..chat import Conversation

__all__ = [
    "API_KEY_ENV",
    "KL_METRICS",
    "NOISE_MULTIPLE",
    "NOISE_WINDOWS",
    "PROTOCOLS",
    "Endpoint",
    "EndpointScores",
    "WindowScores",
    "check_reachable",
    "is_endpoint",
    "kl_bound",
    "noise_floor",
    "public_url",
    "refuse_bound",
    "score_windows",
    "token_strings",
]

API_KEY_ENV = "HEMORRHAGE_API_KEY"
PROTOCOLS = ("auto", "prompt_logprobs", "echo")
KL_METRICS = frozenset({"kl_mean", "kl_p99", "kl_max"})
# windows sent twice to measure how far the server disagrees with itself
NOISE_WINDOWS = 2
# a budget within this multiple of the server's disagreement with itself draws a warning
NOISE_MULTIPLE = 3
_RETRY = frozenset({408, 429, 500, 502, 503, 504})
# a shift is named when the next position's top-1 agrees this much better than the position's own
_SHIFT_MARGIN = 0.2


def is_endpoint(spec: str) -> bool:
    """Whether a candidate spec is a served model's base URL."""
    return spec.startswith(("http://", "https://"))


def public_url(url: str) -> str:
    """``url`` as a report may show it: without a user name, password, query or fragment."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def check_reachable(url: str, timeout: float = 5.0) -> None:
    """A cheap startup check: the server answers ``GET {url}/models`` (any HTTP status counts:
    a 401 means it is there); otherwise a one-line :class:`HemorrhageError`."""
    request = urllib.request.Request(url.rstrip("/") + "/models", headers=_headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise HemorrhageError(
            f"--hemorrhage-candidate={url}: no server answers there ({first_line(reason)}); "
            "start it first, or give its base URL (http://HOST:PORT/v1)"
        ) from None


def _headers() -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(API_KEY_ENV)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


@dataclass
class WindowScores:
    """One window as the server scored it, per position 1..L-1 (position 0 has no prediction):
    the actual token's log-prob (NaN where none came back), the returned ids known for sure
    and their log-probs (a text key that several ids decode to is left out), and the ids the
    top entry can be."""

    target_logp: list[float]
    ids: list[list[int]]
    logps: list[list[float]]
    best: list[tuple[int, ...]]


@dataclass
class EndpointScores:
    """Per scored token (windows x positions, flattened, as the reference's rows): what the
    metrics need, with the coarsened KL (a lower bound, exact where ``covered``)."""

    kl: Any  # (N,) float32, the lower bound
    nll: Any  # (N,) float32
    disagree: Any  # (N,) bool
    p_target: Any  # (N,) float32
    present: Any  # (N,) bool: the server returned this position
    exact: bool  # every present row's returned ids cover the vocabulary
    returned: int  # the fewest unambiguous ids returned at any present position
    details: dict[str, Any] = field(default_factory=dict)


class Endpoint:
    """An OpenAI-compatible server's ``/completions`` as a candidate.

    Args:
        url: the base URL, e.g. ``http://127.0.0.1:8000/v1``.
        tokenizer: the baseline's tokenizer (the echo protocol sends text and reads token text).
        model: the served model's name (default: the first one ``GET /models`` lists).
        logprobs: k, the top entries asked per position (at least 2).
        protocol: ``auto``, ``prompt_logprobs`` or ``echo``.
        concurrency: requests in flight.
        timeout: seconds per request.
        retries: further tries after a 408, 429 or 5xx answer or a dropped connection, with
            exponential backoff from ``backoff`` seconds.

    Attributes:
        on_response: called once per scoring request answered (a progress bar's advance).
    """

    def __init__(
        self,
        url: str,
        tokenizer: Any,
        *,
        model: str | None = None,
        logprobs: int = 20,
        protocol: str = "auto",
        concurrency: int = 4,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        if not isinstance(logprobs, int) or logprobs < 2:
            raise HemorrhageError(
                f"{url}: logprobs={logprobs!r}: the top-1 and any KL need at least 2 entries "
                "per position; ask for logprobs=2 or more (20 is vLLM's default cap)"
            )
        if protocol not in PROTOCOLS:
            raise HemorrhageError(f"{url}: protocol={protocol!r}: give one of {PROTOCOLS}")
        self.url = url.rstrip("/")
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.protocol = protocol
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.model = model or self._served_model()
        self.on_response: Callable[[], None] | None = None
        self._server: str | None | bool = False  # False: not asked yet
        self._render_forms = ("/apply-template", "/tokenize")  # those not yet refused
        self._strings: list[str] | None = None
        self._by_string: dict[str, tuple[int, ...]] | None = None

    # -- HTTP -----------------------------------------------------------------------------

    def _request(
        self,
        path: str,
        body: dict[str, Any] | None = None,
        retries: int | None = None,
        root: bool = False,
    ) -> dict[str, Any]:
        """One JSON request, retried on 408/429/5xx and dropped connections; ``root``: the
        path is the server's (``/tokenize``), not under the base URL's ``/v1``."""
        data = None if body is None else json.dumps(body).encode()
        retries = self.retries if retries is None else retries
        base = self.url.removesuffix("/v1") if root else self.url
        for attempt in range(retries + 1):
            request = urllib.request.Request(base + path, data=data, headers=_headers())
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.load(response)
            except urllib.error.HTTPError as exc:
                text = exc.read().decode("utf-8", "replace").strip()
                if exc.code not in _RETRY or attempt == retries:
                    raise _HttpError(exc.code, text) from None
            except (urllib.error.URLError, OSError) as exc:
                if attempt == retries:
                    reason = getattr(exc, "reason", exc)
                    raise HemorrhageError(
                        f"{self.url}{path}: no answer after {attempt + 1} tries "
                        f"({first_line(reason)}); is the server up, and is --timeout enough?"
                    ) from None
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._request("/completions", body)
        except _HttpError as exc:
            raise HemorrhageError(
                f"{self.url}/completions: HTTP {exc.status} after {self.retries + 1} tries: "
                f"{_body_line(exc.body)}"
            ) from None

    def _served_model(self) -> str:
        try:
            listed = self._request("/models").get("data") or []
        except _HttpError as exc:
            raise HemorrhageError(
                f"{self.url}/models: HTTP {exc.status}: {_body_line(exc.body)}; give the served "
                "model's name (measure_model(url, model=...))"
            ) from None
        if not listed:
            raise HemorrhageError(f"{self.url}/models lists no model; give model=NAME")
        return str(listed[0]["id"])

    # -- protocols ------------------------------------------------------------------------

    def _ids_body(self, ids: list[int]) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt": ids,
            "max_tokens": 1,
            "temperature": 0,
            "prompt_logprobs": self.logprobs,
        }

    def _echo_body(self, ids: list[int]) -> dict[str, Any]:
        # max_tokens 1, not 0: llama-cpp-python reads 0 as "until the context is full"
        return {
            "model": self.model,
            "prompt": self.tokenizer.decode(ids),
            "max_tokens": 1,
            "temperature": 0,
            "echo": True,
            "logprobs": self.logprobs,
        }

    def _choose_protocol(self, ids: list[int]) -> None:
        if self.protocol != "auto":
            return
        try:
            # one try: llama-cpp-python answers a token-id prompt with a 500, not a 4xx
            response = self._request("/completions", self._ids_body(ids), retries=0)
        except _HttpError as exc:
            if exc.status in (429, 503):  # busy, not a refusal: ask again, with backoff
                response = self._post(self._ids_body(ids))
            else:
                self.protocol = "echo"  # token-id prompts or prompt_logprobs refused
                return
        choices = response.get("choices") or [{}]
        self.protocol = "prompt_logprobs" if choices[0].get("prompt_logprobs") else "echo"

    def body(self, ids: list[int]) -> dict[str, Any]:
        """The request that scores the window ``ids`` in the protocol chosen (``auto`` not
        yet resolved: the token-id form it tries first)."""
        return self._echo_body(ids) if self.protocol == "echo" else self._ids_body(ids)

    def score(self, windows: list[list[int]]) -> list[WindowScores]:
        """Every window scored by the server, ``concurrency`` requests in flight, in order."""
        self._choose_protocol(windows[0])
        if self.protocol == "echo" and self.tokenizer is None:
            raise HemorrhageError(
                f"{self.url}: this server takes text prompts (echo), and the run has no "
                "baseline tokenizer to write them; pass --hemorrhage-model as well, or serve "
                "with token-id prompts (vLLM prompt_logprobs)"
            )
        parse = self._parse_ids if self.protocol == "prompt_logprobs" else self._parse_echo
        body = self._ids_body if self.protocol == "prompt_logprobs" else self._echo_body

        def one(index: int) -> WindowScores:
            scored = parse(index, windows[index], self._post(body(windows[index])))
            if self.on_response is not None:
                self.on_response()
            return scored

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, range(len(windows))))

    def _parse_ids(self, index: int, ids: list[int], response: dict[str, Any]) -> WindowScores:
        rows = (response.get("choices") or [{}])[0].get("prompt_logprobs")
        if not isinstance(rows, list) or len(rows) < len(ids):
            got = "none" if not isinstance(rows, list) else f"{len(rows)} positions"
            raise HemorrhageError(
                f"{self.url}: window {index}: prompt_logprobs for {len(ids)} prompt tokens "
                f"expected, got {got}; vLLM needs --max-logprobs >= {self.logprobs}"
            )
        scores = WindowScores([], [], [], [])
        for position in range(1, len(ids)):
            row = rows[position] or {}
            returned = [int(key) for key in row]
            logps = [_logprob(value) for value in row.values()]
            own = row.get(str(ids[position]))
            if own is None:  # a partly scored measure is never a pass
                raise HemorrhageError(
                    f"{self.url}: window {index}: no log-prob for prompt token {position} "
                    f"(id {ids[position]}); the server must return every prompt token's"
                )
            scores.target_logp.append(_logprob(own))
            scores.ids.append(returned)
            scores.logps.append(logps)
            scores.best.append((returned[logps.index(max(logps))],) if logps else ())
        return scores

    def _parse_echo(self, index: int, ids: list[int], response: dict[str, Any]) -> WindowScores:
        choice = (response.get("choices") or [{}])[0]
        logprobs = choice.get("logprobs") or {}
        tokens, values = logprobs.get("tokens"), logprobs.get("token_logprobs")
        tops = logprobs.get("top_logprobs")
        if not tokens or values is None or tops is None:
            raise HemorrhageError(
                f"{self.url}: window {index}: no prompt log-probabilities came back for echo "
                "with logprobs; the server must return them for the prompt (llama.cpp's "
                "llama-server rejects echo: serve the file with llama-cpp-python, or vLLM)"
            )
        strings, by_string = self._token_strings()
        bos = getattr(self.tokenizer, "bos_token_id", None)
        # the server leaves a leading BOS out of the echoed tokens
        lead = 1 if bos is not None and ids[0] == bos else 0
        expected = ids[lead:]
        for i, token_id in enumerate(expected):
            server = tokens[i] if i < len(tokens) else None
            if server != strings[token_id]:
                raise HemorrhageError(
                    f"{self.url}: window {index}: the server's tokens differ from the "
                    f"reference's at position {i + lead}: reference {token_id} "
                    f"{strings[token_id]!r}, server {server!r}; serve the baseline's tokenizer, "
                    "or use a server that takes token ids (vLLM prompt_logprobs)"
                )
        prompt_tokens = (response.get("usage") or {}).get("prompt_tokens")
        if prompt_tokens is not None and prompt_tokens != len(ids):
            raise HemorrhageError(
                f"{self.url}: window {index}: the server read {prompt_tokens} prompt tokens "
                f"for the reference's {len(ids)} (it added a BOS token, or re-tokenized); "
                "gate with data whose windows start as the server's prompts do"
            )
        scores = WindowScores([], [], [], [])
        for position in range(1, len(ids)):
            j = position - lead
            value, top = values[j], tops[j] or {}
            if value is None and j > 0:  # j = 0: OpenAI's null first entry, after a BOS
                raise HemorrhageError(
                    f"{self.url}: window {index}: no log-prob for prompt token {position}; "
                    "the server must return every prompt token's"
                )
            scores.target_logp.append(math.nan if value is None else float(value))
            returned, logps, best, high = [], [], (), -math.inf
            for key, logp in top.items():
                candidates = by_string.get(key, ())
                if logp > high:
                    best, high = candidates, logp
                if len(candidates) == 1:
                    returned.append(candidates[0])
                    logps.append(logp)
            scores.ids.append(returned)
            scores.logps.append(logps)
            scores.best.append(best)
        return scores

    def _token_strings(self) -> tuple[list[str], dict[str, tuple[int, ...]]]:
        """Each id's text as llama.cpp's detokenizer writes it (its bytes, invalid UTF-8
        dropped), and each text's ids."""
        if self._strings is None:
            self._strings = token_strings(self.tokenizer)
            by: dict[str, list[int]] = {}
            for i, s in enumerate(self._strings):
                by.setdefault(s, []).append(i)
            self._by_string = {s: tuple(v) for s, v in by.items()}
        assert self._by_string is not None
        return self._strings, self._by_string

    @staticmethod
    def requests(windows: int) -> int:
        """The scoring requests a measure of ``windows`` windows sends (the noise floor's
        repeats included)."""
        return windows + min(NOISE_WINDOWS, windows)

    def server_version(self) -> str | None:
        """What the server says it is, asked once: vLLM's and SGLang's ``GET /version``,
        llama.cpp's ``GET /props`` build, else a FastAPI server's ``/openapi.json`` title and
        version (llama-cpp-python's); None when none answers."""
        if self._server is False:
            self._server = None
            for path, read in (
                ("/version", lambda r: r.get("version")),
                ("/props", lambda r: r.get("build_info")),
                ("/openapi.json", _openapi_version),
            ):
                try:
                    found = read(self._request(path, retries=0, root=True))
                except (_HttpError, HemorrhageError, ValueError, AttributeError):
                    continue
                if isinstance(found, str) and found.strip():
                    self._server = found.strip()
                    break
        return self._server or None

    def chat_template(
        self, tokenizer: Any, path: Path, count: int, template: str | None = None
    ) -> str:
        """The server's rendering of the first ``count`` conversations of ``path`` against the
        baseline's (``tokenizer`` with ``template``, else its own chat template), token by
        token, stopping at the first conversation that differs: ``"same"``, ``"differs at
        token i: 'x' vs 'y' (FILE:LINE)"`` (the baseline's token, then the server's; ``the
        end`` past one's last) or ``"not exposed by this server"``."""
        from ..chat import read_conversations, render

        for conversation in read_conversations(path)[:count]:
            theirs = self._rendered(tokenizer, conversation)
            if theirs is None:
                return "not exposed by this server"
            mine = render(tokenizer, conversation, template).ids
            if mine == theirs:
                continue
            pairs = zip(mine, theirs, strict=False)
            at = next((k for k, (a, b) in enumerate(pairs) if a != b), min(len(mine), len(theirs)))
            return (
                f"differs at token {at}: {_token_at(tokenizer, mine, at)} vs "
                f"{_token_at(tokenizer, theirs, at)} ({conversation.where})"
            )
        return "same"

    def _rendered(self, tokenizer: Any, conversation: Conversation) -> list[int] | None:
        """The server's token ids of ``conversation`` rendered by its chat template, no
        generation prompt (None: it exposes no rendering). A form the server refuses is not
        tried again; a 4xx or 5xx is "not exposed": the comparison never fails a measure."""
        messages: dict[str, Any] = {"messages": conversation.messages}
        if conversation.tools:
            messages["tools"] = conversation.tools
        for form in list(self._render_forms):
            try:
                if form == "/apply-template":  # llama.cpp's llama-server: the rendered text
                    text = self._request(form, messages, retries=0, root=True)["prompt"]
                    tokens = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
                else:  # vLLM: the rendered template's token ids, without special tokens added
                    body = {"model": self.model, **messages, "add_generation_prompt": False}
                    body["add_special_tokens"] = False
                    tokens = self._request(form, body, retries=0, root=True)["tokens"]
            except (_HttpError, KeyError, TypeError):
                tokens = None
            # llama-server's /tokenize answers messages (no "content") with no tokens
            if isinstance(tokens, list) and tokens:
                return [int(t) for t in tokens]
            self._render_forms = tuple(f for f in self._render_forms if f != form)
        return None

    def describe(self) -> dict[str, Any]:
        """What ran it, for ``Result.details["runtime"]`` (never the API key nor the URL's
        credentials); ``server``: what it says it is, where it says."""
        return {
            "name": "endpoint",
            "url": public_url(self.url),
            "protocol": self.protocol,
            "model": self.model,
            "logprobs": self.logprobs,
            "server": self.server_version(),
        }


def _token_at(tokenizer: Any, ids: list[int], at: int) -> str:
    return repr(tokenizer.decode([ids[at]])) if at < len(ids) else "the end"


def _openapi_version(schema: dict[str, Any]) -> str | None:
    """``title version`` of a FastAPI server's schema, the title's emoji dropped."""
    info = schema.get("info") or {}
    title = str(info.get("title", "")).encode("ascii", "ignore").decode().strip()
    return f"{title} {info['version']}".strip() if info.get("version") else None


class _HttpError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(status, body)
        self.status, self.body = status, body


def _body_line(body: str, limit: int = 200) -> str:
    """An error body's first line, its JSON ``error.message`` when it has one, cut short."""
    try:
        error = json.loads(body).get("error", body)
        body = str(error.get("message", error) if isinstance(error, dict) else error)
    except (ValueError, AttributeError):
        pass
    line = first_line(body) or "(empty body)"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _logprob(value: Any) -> float:
    """vLLM writes ``{"logprob": x, "rank": r, "decoded_token": s}``; others a bare float."""
    return float(value["logprob"] if isinstance(value, dict) else value)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: each printable stand-in character -> its byte."""
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def token_strings(tokenizer: Any) -> list[str]:
    """Every id's text as one token's detokenization gives it: byte-level BPE pieces mapped to
    their bytes, SentencePiece's ``▁`` a space and ``<0xNN>`` a byte, then decoded as UTF-8
    with invalid bytes dropped (what llama.cpp-based servers put in ``tokens``)."""
    decoder = _byte_decoder()
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    out = []
    for piece in pieces:
        piece = piece or ""
        if piece in special:
            raw = b""
        elif (m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)) is not None:
            raw = bytes([int(m.group(1), 16)])
        elif all(c in decoder for c in piece):
            raw = bytes(decoder[c] for c in piece)
        else:
            raw = piece.replace("\u2581", " ").encode()
        out.append(raw.decode("utf-8", errors="ignore"))
    return out


def score_windows(windows: list[WindowScores], reference: Any, vocab: int) -> EndpointScores:
    """The per-token measures of the served model against ``reference`` (its rows in window
    order), the KL being the coarsened lower bound (see the module docstring); a one-position
    shift of the server's answers (the distribution of the next position reported at each) is a
    one-line :class:`HemorrhageError`."""
    import torch

    target = torch.tensor([v for w in windows for v in w.target_logp], dtype=torch.float64)
    ids_rows = list(chain.from_iterable(w.ids for w in windows))
    tops = list(chain.from_iterable(w.best for w in windows))
    top1 = reference.top1.tolist()
    disagree = torch.tensor([bool(b) and t not in b for t, b in zip(top1, tops, strict=True)])
    # every returned (row, id, log-prob) at once: the KL's terms are sums over each row
    lengths = torch.tensor([len(r) for r in ids_rows])
    row = torch.repeat_interleave(torch.arange(len(ids_rows)), lengths)
    idx = torch.tensor(list(chain.from_iterable(ids_rows)), dtype=torch.long)
    lq = torch.tensor(
        list(chain.from_iterable(lp for w in windows for lp in w.logps)), dtype=torch.float64
    )
    if reference.p is not None:
        p = reference.p[row, idx].double()
    else:
        # top-K storage: only the returned ids the reference kept are outcomes of their own
        hit = reference.topk_idx.long()[row] == idx[:, None]
        p = reference.head_logp()[row, hit.int().argmax(1)].double().exp() * hit.any(1)
    own = p > 0
    terms = torch.where(own, p * (p.clamp_min(1e-300).log() - lq), 0)
    sums = torch.zeros(3, len(ids_rows), dtype=torch.float64)
    for i, values in enumerate((terms, p, torch.where(own, lq.exp(), 0))):
        sums[i].index_add_(0, row, values)
    p_rest = (1 - sums[1]).clamp_min(0)
    q_rest = (1 - sums[2]).clamp_min(1e-12)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-300).log() - q_rest.log()), 0)
    kl = (sums[0] + rest).clamp_min(0)
    counted = lengths[lengths > 0]
    fewest = int(counted.min()) if len(counted) else 0
    present = target.isfinite()
    per_window = len(windows[0].target_logp) if windows else 0
    details = {"shift": _shift(tops, top1, per_window)}
    if details["shift"]["shifted"]:
        s = details["shift"]
        raise HemorrhageError(
            "the server's log-probs are shifted by one position: each position's top-1 "
            f"matches the reference's for the next token ({s['next']:.0%}) far more than its "
            f"own ({s['own']:.0%}); llama-cpp-python's server does this when the prompt has no "
            "BOS token: gate with windows that begin with BOS, or serve with vLLM/SGLang token-id "
            "prompts"
        )
    return EndpointScores(
        kl=kl.float(),
        nll=(-target).float(),
        disagree=disagree,
        p_target=target.exp().nan_to_num(0).float(),
        present=present,
        # exact only against exact storage: top-K storage knows K of the baseline's ids
        exact=reference.p is not None and fewest >= vocab,
        returned=fewest,
        details=details,
    )


def _shift(tops: list[tuple[int, ...]], top1: list[int], per_window: int) -> dict[str, Any]:
    """How often each position's top entry is the reference's top-1 for its own token and for
    the next one (within a window)."""
    own = nxt = count = 0
    for r, best in enumerate(tops):
        if not best or (r + 1) % per_window == 0:
            continue
        count += 1
        own += top1[r] in best
        nxt += top1[r + 1] in best
    own_rate, next_rate = own / max(count, 1), nxt / max(count, 1)
    return {
        "own": own_rate,
        "next": next_rate,
        "shifted": next_rate > 0.5 and next_rate > own_rate + _SHIFT_MARGIN,
    }


def kl_bound(scores: EndpointScores, metrics: dict[str, float]) -> dict[str, Any]:
    """The KL metrics as intervals: ``[value, value]`` when the returned ids cover the
    vocabulary, else ``[value, None]`` (a lower bound; no finite upper one, see the module
    docstring)."""
    return {
        "exact": scores.exact,
        "returned_ids": scores.returned,
        "interval": {
            m: [metrics[m], metrics[m] if scores.exact else None]
            for m in sorted(KL_METRICS)
            if m in metrics
        },
        "why": "exact: the returned ids cover the vocabulary"
        if scores.exact
        else "lower bound: KL of the returned ids plus one bucket for the rest (merging "
        "outcomes never raises KL); no finite upper bound without an assumption on the "
        "unreturned mass",
    }


def refuse_bound(endpoint: Endpoint, budgeted: list[str], scores: EndpointScores) -> None:
    """Under ``confidence``, a KL budget on a KL known only from below is refused, one line."""
    if budgeted:
        raise HemorrhageError(
            f"{endpoint.url}: {', '.join(budgeted)} under confidence: the server returned "
            f"{scores.returned} ids at some position, so KL is only a lower bound and cannot "
            "show the budget holds; ask for logprobs covering the vocabulary (vLLM "
            "--max-logprobs), or budget ppl_increase / top1_disagreement, which are exact"
        )


def noise_floor(
    endpoint: Endpoint, windows: list[list[int]], served: list[WindowScores], budget: Any = None
) -> dict:
    """The first windows sent again: how far the server's answers differ from its own earlier
    ones (largest and mean absolute difference of the actual tokens' log-probs, share of
    positions whose top entry changed). A warning names each budget of ``budget`` (``limits``)
    within ``NOISE_MULTIPLE`` times the matching figure: it would gate the server's
    nondeterminism, not damage."""
    count = min(NOISE_WINDOWS, len(windows))
    again = endpoint.score(windows[:count])
    diffs, changed, positions = [], 0, 0
    for first, second in zip(served[:count], again, strict=True):
        for a, b in zip(first.target_logp, second.target_logp, strict=True):
            if math.isfinite(a) and math.isfinite(b):
                diffs.append(abs(a - b))
        for ea, eb in zip(first.best, second.best, strict=True):
            if ea and eb:
                positions += 1
                changed += ea != eb
    floor = {
        "windows": count,
        "max_abs_logprob_diff": max(diffs, default=0.0),
        "mean_abs_logprob_diff": sum(diffs) / max(len(diffs), 1),
        "top1_changed": changed / max(positions, 1),
    }
    # a metric's own noise: the mean |change| of a token's log-prob moves nll_increase (and,
    # near 0, ppl_increase) by up to as much; top-1 flips move top1_disagreement
    noise = {
        "nll_increase": floor["mean_abs_logprob_diff"],
        "ppl_increase": math.expm1(floor["mean_abs_logprob_diff"]),
        "top1_disagreement": floor["top1_changed"],
    }
    for metric, limit in sorted(getattr(budget, "limits", {}).items()):
        if metric in noise and noise[metric] > 0 and limit <= NOISE_MULTIPLE * noise[metric]:
            warnings.warn(
                f"{endpoint.url}: {metric} budget {limit:g} is within {NOISE_MULTIPLE}x the "
                f"server's disagreement with itself ({noise[metric]:.3g} on repeated "
                "requests): it gates the server's nondeterminism; raise the budget or make "
                "the server deterministic (batch-invariant kernels, one request at a time)",
                stacklevel=2,
            )
    return floor
