"""The run: loads the model once, collects every result, writes the report."""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import __version__
from .budget import Budget, parse_ini
from .errors import HemorrhageError
from .plain import first_unplain, plain

if TYPE_CHECKING:
    import pytest

    from .harness import Harness
    from .loading import LoadedModel
    from .metrics import Result
    from .reference_file import PortableReference
    from .regressions import OldReport, Tolerance
    from .settings import Settings

__all__ = ["REPORT_SCHEMA", "HemorrhageSession"]

# 2: candidates (list), comparison (header), per result comparison, reference_file (header)
# 3: environments (header), per result and exploration environment, data.reference_environment,
#    reference_file.environment, per result comparison.environment
REPORT_SCHEMA = 3
NO_MODEL = (
    "no model given: pass --hemorrhage-model=<dir | hub id | module:factory | "
    "hemorrhage-tiny> or set hemorrhage_model in the ini file"
)


@dataclass
class HemorrhageSession:
    """State of one pytest run (a worker's, under xdist), kept in ``config.stash``."""

    settings: Settings
    hook: Any = None  # config.hook, to ask plugins for their modifications
    records: list[dict[str, Any]] = field(default_factory=list)
    explorations: list[dict[str, Any]] = field(default_factory=list)  # thresholds, sweeps
    header: dict[str, Any] = field(default_factory=dict)
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> header
    # where results were measured, by environment_id: this process's (every worker's, on the
    # controller), and the reference file's
    environments: dict[str, dict[str, Any]] = field(default_factory=dict)
    default_budget: Budget = field(init=False)
    portable: PortableReference | None = None  # --hemorrhage-reference, read at startup
    old_report: OldReport | None = None  # --hemorrhage-compare
    tolerances: tuple[Tolerance, ...] = ()  # --hemorrhage-compare-fail
    # results (records and explorations) kept per test id: on a worker, what its reports
    # announce; on the controller, what arrived
    counts: Counter[str] = field(default_factory=Counter)
    announced: Counter[str] = field(default_factory=Counter)  # controller: per the reports
    failures: list[str] = field(default_factory=list)  # lines that fail the run: results lost
    _workers_down: set[int] = field(default_factory=set)
    _loaded: LoadedModel | None = None
    _harness: Harness | None = None
    _candidate: Any = None  # the one candidate held (loaded once per spec, then released)
    _environment: str | None = None  # this process's, by environment_id, once measured

    def __post_init__(self) -> None:
        self.default_budget = parse_ini(self.settings.budget)  # a bad ini budget: at startup
        s = self.settings
        if s.compare_fail and s.compare is None:
            raise HemorrhageError(
                f"--hemorrhage-compare-fail={s.compare_fail}: nothing to compare with; pass "
                "--hemorrhage-compare=OLD_REPORT.json too"
            )
        if s.compare is not None:
            from .regressions import OldReport, parse_tolerances

            self.tolerances = parse_tolerances(s.compare_fail) if s.compare_fail else ()
            self.old_report = OldReport.load(s.compare)
        if s.save_reference is not None and s.model is None:
            raise HemorrhageError(
                f"--hemorrhage-save-reference={s.save_reference}: needs the baseline model; "
                "pass --hemorrhage-model too"
            )
        if s.reference is not None:
            from .reference_file import PortableReference

            self.portable = PortableReference.load(s.reference)

    @property
    def reference_only(self) -> bool:
        """Gating from a reference file alone: the baseline model is never loaded."""
        return self.portable is not None and self.settings.model is None

    def loaded(self) -> LoadedModel:
        """The baseline model, loaded on first use. A model that cannot be loaded stops the
        session: one line naming it and the fix, not the same error in every test."""
        import pytest

        if self.settings.model is None:
            pytest.skip(NO_MODEL)
        if self._loaded is None:
            from .devices import parse_device_map
            from .loading import load_model
            from .memory import check_window

            s = self.settings
            try:
                check_window(s)  # the window against the context and the memory: no weight read
                self._loaded = load_model(
                    s.model,
                    device=s.device,
                    device_map=s.device_map and parse_device_map(s.device_map),
                    dtype=s.dtype,
                    trust_remote_code=s.trust_remote_code,
                    allow_pickle=s.allow_pickle,
                )
            except HemorrhageError as exc:
                pytest.exit(f"hemorrhage: {exc}", returncode=pytest.ExitCode.USAGE_ERROR)
        return self._loaded

    def harness(self) -> Harness:
        if self._harness is None:
            from .harness import Harness
            from .modifications import register_modification

            loaded = self._baseline()
            if self.hook is not None:
                self.hook.pytest_hemorrhage_modifications(register=register_modification)
            self._harness = Harness(loaded, self.settings, self.portable)
            model = loaded.model
            self.header = {
                "model": dict(self.portable.baseline)  # type: ignore[union-attr]
                if model is None
                else {
                    "spec": loaded.spec,
                    "kind": loaded.kind,
                    **({"pooling": loaded.pooling.source} if loaded.pooling else {}),
                    "fingerprint": loaded.fingerprint,
                    "class": type(model).__name__,
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                    "device": str(loaded.device),
                },
                "data": {
                    "source": str(self.settings.data or "bundled corpus"),
                    "fingerprint": self._harness.data_fingerprint,
                    "seq_len": self.settings.seq_len,
                    "windows": len(self._harness.windows.eval),
                    "topk": self._harness.topk,
                    **(
                        {
                            "reference": str(self.settings.reference),
                            "reference_environment": self._note_environment(
                                self.portable.environment
                            ),
                        }
                        if self.portable
                        else {}
                    ),
                },
            }
            if self._harness.texts is not None:  # an encoder: texts, not windows
                self.header["data"] = {
                    "source": self.header["data"]["source"],
                    "fingerprint": self._harness.data_fingerprint,
                    "max_tokens_per_text": self.settings.seq_len,
                    "texts": len(self._harness.texts.texts),
                }
        return self._harness

    def environment(self) -> str:
        """This process's environment (see :mod:`pytest_hemorrhage.environment`), by its id in
        ``environments``: measured once, at the first result, with the baseline's device and
        dtype (reference only: no dtype; a candidate's runtime is in its result's details)."""
        if self._environment is None:
            from .environment import measured_in

            loaded = self.harness().loaded
            model = loaded.model
            dtype = next(model.parameters()).dtype if model is not None else None
            self._environment = self._note_environment(measured_in(loaded.device, dtype))
        return self._environment

    def _note_environment(self, environment: dict[str, Any] | None) -> str | None:
        """Keep ``environment`` in ``environments``; its id (None: not recorded)."""
        if environment is None:
            return None
        from .environment import environment_id

        key = environment_id(environment)
        self.environments.setdefault(key, plain(environment))
        return key

    def _baseline(self) -> Any:
        """The loaded baseline checked against ``--hemorrhage-reference``; with the file alone,
        its stand-in (no model). A mismatch stops the session with one line."""
        import pytest

        if self.portable is None:
            return self.loaded()
        from .data import read_text
        from .loading import quiet
        from .reference_file import AbsentBaseline

        try:
            self.portable.check_settings(self.settings, read_text(self.settings.data))
            if self.settings.model is None:
                with quiet():
                    import torch

                device = self.settings.device
                if device == "auto":
                    device = "cuda" if torch.cuda.is_available() else "cpu"
                baseline = self.portable.baseline
                return AbsentBaseline(
                    str(baseline.get("spec")),
                    str(baseline.get("fingerprint")),
                    torch.device(device),
                )
            loaded = self.loaded()
            self.portable.check_baseline(loaded.spec, loaded.fingerprint)
        except HemorrhageError as exc:
            pytest.exit(f"hemorrhage: {exc}", returncode=pytest.ExitCode.USAGE_ERROR)
        return loaded

    def candidate(self, spec: str) -> LoadedModel:
        """The candidate ``spec``, loaded once; loading another releases the one held, so a
        session holds at most the baseline and one candidate."""
        held = self._candidate
        if held is not None and held.spec == spec:
            return held
        self._candidate = None
        if held is not None:
            del held
            import gc

            gc.collect()  # the model's tensors go now, before the next one loads
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        from .candidates import load_candidate

        s = self.settings
        self._candidate = load_candidate(
            spec,
            device=s.device,
            dtype=s.dtype,
            trust_remote_code=s.trust_remote_code,
            allow_pickle=s.allow_pickle,
            gguf_runtime=s.gguf_runtime,
            context=s.seq_len,
        )
        return self._candidate

    def held_candidate(self, fingerprint: str) -> Any:
        """The candidate held now if its fingerprint is ``fingerprint``, else None."""
        held = self._candidate
        return held if held is not None and held.fingerprint == fingerprint else None

    def note_candidate(self, label: str, loaded: Any) -> None:
        """Describe a measured candidate in the report's ``candidates``."""
        model = loaded.model
        quantization = getattr(getattr(model, "config", None), "quantization_config", None)
        if quantization is not None and not isinstance(quantization, dict):
            quantization = quantization.to_dict() if hasattr(quantization, "to_dict") else None
        self.candidates[label] = self._plain(
            label,
            {
                "label": label,
                "spec": str(loaded.spec),
                "fingerprint": loaded.fingerprint,
                "class": type(model).__name__,
                "parameters": sum(p.numel() for p in model.parameters()),
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                "quantization": (quantization or {}).get("quant_method") if quantization else None,
            },
        )

    def note_endpoint(self, label: str, result: Result) -> None:
        """Describe a measured served model in the report's ``candidates``: its URL (without
        credentials), served model, protocol, what the server says it is, and its noise floor;
        never the API key."""
        runtime = result.details["runtime"]
        self.candidates[label] = self._plain(
            label,
            {
                "label": label,
                "spec": runtime["url"],
                "endpoint": {
                    key: runtime[key] for key in ("url", "model", "protocol", "server", "logprobs")
                },
                "noise_floor": result.details["noise_floor"],
            },
        )

    def save_reference(self) -> None:
        """``--hemorrhage-save-reference``: write the baseline's reference file."""
        from .data import read_text
        from .reference_file import PortableReference, text_hash, vocab_list

        path = self.settings.save_reference
        assert path is not None
        harness = self.harness()
        if harness.texts is not None:
            raise HemorrhageError(
                f"--hemorrhage-save-reference={path}: reference files hold next-token "
                "distributions; an encoder's embeddings are not supported"
            )
        s = self.settings
        environment = self.environments[self.environment()]
        portable = PortableReference(
            harness.reference,
            harness.windows.eval,
            harness.vocab,
            vocab_list(harness.loaded.tokenizer),
            dict(self.header["model"]),
            {
                "seq_len": s.seq_len,
                "tokens": s.tokens,
                "data": str(s.data or "bundled corpus"),
                "data_hash": text_hash(read_text(s.data)),
                "topk": harness.topk,
            },
            environment=environment,
        )
        size = portable.save(path)
        scored = len(harness.reference.targets)
        self.header["reference_file"] = {
            "path": str(path),
            "bytes": size,
            "bytes_per_token": size / scored,
            "environment": self.environment(),
        }

    def comparison_failures(self, nodeid: str) -> list[str]:
        """The ``--hemorrhage-compare-fail`` lines of the test's recorded results."""
        return [
            line
            for record in self.records
            if record["nodeid"] == nodeid
            for line in record.get("comparison", {}).get("failures", [])
        ]

    def budget_for(self, item: pytest.Item) -> Budget:
        """The ini budget with the item's ``hemorrhage`` marker keys on top."""
        budget = self.default_budget
        for marker in reversed(list(item.iter_markers("hemorrhage"))):
            if marker.args:
                raise HemorrhageError(
                    f"{item.nodeid}: @pytest.mark.hemorrhage takes keyword "
                    "arguments only, e.g. hemorrhage(ppl_increase=0.05)"
                )
            budget = budget.merged(Budget.parse(marker.kwargs, where=item.nodeid))
        if self._loaded is not None:  # the model's kind is known: its metrics only
            from .embeddings import check_kind

            check_kind(budget.limits, self._loaded.kind, item.nodeid)
        return budget

    def record(self, item: pytest.Item, result: Result, budget: Budget) -> None:
        """Keep ``result`` for the summary and report, as plain data (what a handler, loader or
        library put in it, converted here: see :mod:`pytest_hemorrhage.plain`); expose its
        metrics to JUnit XML. The result's ``details`` become the record's, so that a diagnosis
        added to them later (``blame``) is in the report too."""
        if "baseline" not in self.header:
            # the reference's, over every window: an early-stopped result's is over those it
            # scored, and which result comes first differs between runs (xdist or not)
            reference = self._harness.reference if self._harness is not None else None
            self.header["baseline"] = {"ppl": getattr(reference, "ppl", result.baseline_ppl)}
        record = self._plain(
            item.nodeid,
            {
                "nodeid": item.nodeid,
                **result.to_dict(),
                "budget": budget.to_dict(),
                "violations": budget.violations(result),
                "outcome": None,
                "environment": self.environment(),
            },
            notes_in="details",
        )
        result.details = record["details"]
        self.records.append(record)
        self.counts[item.nodeid] += 1
        if self.old_report is not None:
            record["comparison"] = self.old_report.compare(
                record, self.tolerances, self.environments[record["environment"]]
            )
        for metric, value in record["metrics"].items():
            item.user_properties.append((f"hemorrhage.{result.modification}.{metric}", value))

    def _plain(self, where: str, data: dict[str, Any], notes_in: str = "") -> dict[str, Any]:
        """``data`` as plain data; what only its repr could stand for is named under
        ``repr_of`` (in ``data[notes_in]`` when given) and in a warning, never fatal."""
        notes: list[str] = []
        data = plain(data, notes)
        if notes:
            (data[notes_in] if notes_in else data)["repr_of"] = notes
            warnings.warn(
                f"{where}: kept as their repr, having no plain form (numbers, strings, lists, "
                f"dicts): {', '.join(notes)}",
                stacklevel=3,
            )
        return data

    def default_extras(self) -> frozenset[str]:
        """Extra metrics every measure computes, as asked on the command line."""
        extras = {"gen_mismatch", "gen_first_divergence"} if self.settings.generate else set()
        if self.settings.tasks:
            extras |= {"accuracy_drop", "flip_rate"}
        if self._has_routers():  # a mixture of experts: every measure says how routes moved
            extras.add("routing_flip")
        return frozenset(extras)

    def _has_routers(self) -> bool:
        harness = self.harness()
        if "routers" not in harness.memo:
            from .extras.routing import routers

            model = harness.model
            harness.memo["routers"] = model is not None and bool(routers(model))
        return harness.memo["routers"]

    def record_exploration(self, item: pytest.Item, kind: str, data: dict[str, Any]) -> None:
        """Keep a threshold search or sweep for the summary and report, as plain data."""
        self.explorations.append(
            self._plain(
                item.nodeid,
                {"nodeid": item.nodeid, "kind": kind, **data, "environment": self.environment()},
            )
        )
        self.counts[item.nodeid] += 1

    def set_outcome(self, nodeid: str, outcome: str) -> None:
        for record in self.records:
            if record["nodeid"] == nodeid:
                record["outcome"] = outcome

    def check_plain(self) -> None:
        """At the end of the run (a worker's, before it sends): every result is still plain
        data. A value added after the result was recorded (``result.details[...] = ...``) that
        is not becomes its repr here, and a line naming the test and the value fails the run:
        from an xdist worker it could not have been sent."""
        parts = [("", "header", self.header), ("", "candidates", self.candidates)]
        parts += [("", "environments", self.environments)]
        parts += [(r["nodeid"], "result", r) for r in self.records]
        parts += [(e["nodeid"], "exploration", e) for e in self.explorations]
        for nodeid, what, data in parts:
            found = first_unplain(data)
            if found is None:
                continue
            path, value = found
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            self.failures.append(
                f"{nodeid or 'the report'}: {what} {path} = {shown} ({type(value).__name__}) is "
                "not plain data (numbers, strings, lists, dicts) and cannot be sent from an xdist "
                "worker: it was added after the result was recorded; convert it before adding it"
            )
            data.update(plain(data))

    def worker_output(self) -> dict[str, Any]:
        """What a worker sends the controller (plain data, see :meth:`check_plain`)."""
        self.check_plain()
        return {
            "header": self.header,
            "records": self.records,
            "explorations": self.explorations,
            "candidates": self.candidates,
            "environments": self.environments,
            "failures": self.failures,
        }

    def announce(self, nodeid: str, count: int) -> None:
        """The controller: a worker's report says test ``nodeid`` kept ``count`` results."""
        self.announced[nodeid] += count

    def worker_down(
        self, worker: int, name: str, output: dict[str, Any] | None, error: object
    ) -> None:
        """The controller: xdist worker ``name`` is down, having sent ``output`` (None: it
        sent nothing, e.g. it crashed); a crash fails the run."""
        if worker in self._workers_down:  # xdist reports a worker down once more on ^C
            return
        self._workers_down.add(worker)
        if output is None:
            why = str(error).strip().splitlines()[-1] if error else "no error given"
            self.failures.append(
                f"xdist worker {name} went down without sending its hemorrhage results ({why})"
            )
            return
        for key, value in output.get("header", {}).items():
            self.header.setdefault(key, value)
        self.records.extend(output.get("records", []))
        self.explorations.extend(output.get("explorations", []))
        self.candidates.update(output.get("candidates", {}))
        self.environments.update(output.get("environments", {}))
        self.failures.extend(output.get("failures", []))
        self.counts.update(r["nodeid"] for r in output.get("records", []))
        self.counts.update(e["nodeid"] for e in output.get("explorations", []))

    def finish(self) -> list[str]:
        """The lines that fail the run (empty: every result arrived, as plain data): results
        not plain (:meth:`check_plain`), and on the controller, results a worker's reports
        announced that never arrived, and workers that went down without sending."""
        self.check_plain()
        for nodeid, count in self.announced.items():
            missing = count - self.counts[nodeid]
            if missing > 0:
                self.failures.append(
                    f"{nodeid}: {missing} of its {count} hemorrhage results never reached the "
                    "xdist controller: they are missing from the summary and the reports"
                )
        return self.failures

    def report(self) -> dict[str, Any]:
        """The JSON report (schema documented in the README)."""
        return {
            "schema_version": REPORT_SCHEMA,
            "plugin_version": __version__,
            **self.header,
            "candidates": list(self.candidates.values()),
            **(
                {
                    "comparison": {
                        "file": str(self.old_report.path),
                        "fail": [
                            {"metric": t.metric, "limit": t.limit, "relative": t.relative}
                            for t in self.tolerances
                        ],
                    }
                }
                if self.old_report is not None
                else {}
            ),
            "environments": self.environments,
            "results": self.records,
            "explorations": self.explorations,
        }

    def write_reports(self) -> None:
        """The JSON report and the HTML page, where asked for."""
        if self.settings.report is not None:
            from .report.json_report import write_json

            write_json(self.report(), self.settings.report)
        if self.settings.html is not None:
            from .report.html import write_html

            write_html(self.report(), self.settings.html)  # unwritable: one warning, no failure
