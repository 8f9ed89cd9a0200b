"""The run: loads the model once, collects every result, writes the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import __version__
from .budget import Budget, parse_ini
from .errors import HemorrhageError

if TYPE_CHECKING:
    import pytest

    from .harness import Harness
    from .loading import LoadedModel
    from .metrics import Result
    from .settings import Settings

__all__ = ["REPORT_SCHEMA", "HemorrhageSession"]

REPORT_SCHEMA = 1
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
    default_budget: Budget = field(init=False)
    _loaded: LoadedModel | None = None
    _harness: Harness | None = None

    def __post_init__(self) -> None:
        self.default_budget = parse_ini(self.settings.budget)  # a bad ini budget: at startup

    def loaded(self) -> LoadedModel:
        """The baseline model, loaded on first use. A model that cannot be loaded stops the
        session: one line naming it and the fix, not the same error in every test."""
        import pytest

        if self.settings.model is None:
            pytest.skip(NO_MODEL)
        if self._loaded is None:
            from .loading import load_model

            s = self.settings
            try:
                self._loaded = load_model(
                    s.model,
                    device=s.device,
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

            loaded = self.loaded()
            if self.hook is not None:
                self.hook.pytest_hemorrhage_modifications(register=register_modification)
            self._harness = Harness(loaded, self.settings)
            model = loaded.model
            self.header = {
                "model": {
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
        """Keep ``result`` for the summary and report; expose its metrics to JUnit XML."""
        if "baseline" not in self.header:
            self.header["baseline"] = {"ppl": result.baseline_ppl}
        self.records.append(
            {
                "nodeid": item.nodeid,
                **result.to_dict(),
                "budget": budget.to_dict(),
                "violations": budget.violations(result),
                "outcome": None,
            }
        )
        for metric, value in result.metrics.items():
            item.user_properties.append((f"hemorrhage.{result.modification}.{metric}", value))

    def default_extras(self) -> frozenset[str]:
        """Extra metrics every measure computes, as asked on the command line."""
        extras = {"gen_mismatch", "gen_first_divergence"} if self.settings.generate else set()
        if self.settings.tasks:
            extras |= {"accuracy_drop", "flip_rate"}
        return frozenset(extras)

    def record_exploration(self, item: pytest.Item, kind: str, data: dict[str, Any]) -> None:
        """Keep a threshold search or sweep (``data`` JSON-ready) for the summary and report."""
        self.explorations.append({"nodeid": item.nodeid, "kind": kind, **data})

    def set_outcome(self, nodeid: str, outcome: str) -> None:
        for record in self.records:
            if record["nodeid"] == nodeid:
                record["outcome"] = outcome

    def worker_output(self) -> dict[str, Any]:
        return {"header": self.header, "records": self.records, "explorations": self.explorations}

    def merge_worker(self, output: dict[str, Any]) -> None:
        for key, value in output.get("header", {}).items():
            self.header.setdefault(key, value)
        self.records.extend(output.get("records", []))
        self.explorations.extend(output.get("explorations", []))

    def report(self) -> dict[str, Any]:
        """The JSON report (schema documented in the README)."""
        return {
            "schema_version": REPORT_SCHEMA,
            "plugin_version": __version__,
            **self.header,
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
