"""pytest hooks: options, marker, fixtures, summary and report. The work is in session.py."""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import pytest

from .errors import HemorrhageError
from .session import HemorrhageSession
from .settings import OPTIONS, Settings

if TYPE_CHECKING:
    from .fixture import Hemorrhage
    from .loading import LoadedModel

__all__ = ["session_key"]  # the hooks are found by pytest by name

session_key = pytest.StashKey[HemorrhageSession]()


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from . import newhooks

    pluginmanager.add_hookspecs(newhooks)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hemorrhage", "model hemorrhage budgets")
    for option in OPTIONS:
        if option.flag:
            group.addoption(
                f"--hemorrhage-{option.name}",
                action="store_true",
                default=None,
                dest=option.ini,
                help=option.help,
            )
            parser.addini(option.ini, option.help, type="bool", default=False)
        else:
            group.addoption(
                f"--hemorrhage-{option.name}",
                dest=option.ini,
                type=option.type,
                metavar=option.metavar,
                default=None,
                help=option.help.replace("%", "%%"),  # argparse %-formats option help
                action="append" if option.multiple else "store",
            )
            if option.multiple:
                parser.addini(option.ini, option.help, type="linelist", default=[])
            else:
                parser.addini(option.ini, option.help, default="")
    parser.addini(
        "hemorrhage_budget",
        "Default budget for every hemorrhage test, e.g. "
        "'ppl_increase=0.05 kl_mean=0.02'; marker keys override it.",
        default="",
    )


@pytest.hookimpl(tryfirst=True)  # before hypothesis loads --hypothesis-profile
def pytest_configure(config: pytest.Config) -> None:
    from .explore import hypothesis

    config.addinivalue_line(
        "markers",
        "hemorrhage(**budget): maximum tolerated degradation per metric, e.g. "
        "hemorrhage(ppl_increase=0.05, kl_mean=0.02); optional confidence=0.95",
    )
    try:
        settings = Settings.from_config(config)
        from .devices import check_devices  # a device that does not exist: a usage error

        settings = check_devices(settings, getattr(config, "workerinput", {}).get("workerid"))
        if settings.model and not hasattr(config, "workerinput"):
            from .loading import check_spec

            check_spec(settings.model)
        if not hasattr(config, "workerinput"):
            from .candidates import check_candidate

            for spec in settings.candidate:  # a missing path: a usage error, like the model's
                check_candidate(spec)
        if settings.plot:
            from .report.plots import require_matplotlib

            require_matplotlib()
        config.stash[session_key] = HemorrhageSession(settings, hook=config.hook)
    except HemorrhageError as exc:
        raise pytest.UsageError(str(exc)) from None
    hypothesis.configure(config)
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistHooks(config), "hemorrhage-xdist")


@pytest.fixture(scope="session")
def hemorrhage_model(pytestconfig: pytest.Config) -> LoadedModel:
    """The baseline model: ``.model``, ``.tokenizer``, ``.fingerprint``."""
    return pytestconfig.stash[session_key].loaded()


@pytest.fixture
def hemorrhage(request: pytest.FixtureRequest) -> Hemorrhage:
    """Measure, modify and check the baseline under this test's hemorrhage budget."""
    from .fixture import Hemorrhage

    session = request.config.stash[session_key]
    if not session.reference_only:
        request.getfixturevalue("hemorrhage_model")  # no model: skipped, saying which option
    harness = session.harness()
    yield Hemorrhage(harness, session.budget_for(request.node), request.node, session)
    if harness.model is not None:
        harness.check_pristine()


@pytest.fixture
def hemorrhage_candidate(request: pytest.FixtureRequest) -> str:
    """One ``--hemorrhage-candidate`` spec; a test using it runs once per candidate, its id
    showing the label. Pass it to ``hemorrhage.measure_model``."""
    return request.param


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "hemorrhage_candidate" not in metafunc.fixturenames:
        return
    from .candidates import candidate_label

    specs = metafunc.config.stash[session_key].settings.candidate
    if not specs:
        skip = pytest.mark.skip(
            reason="no candidate given: pass --hemorrhage-candidate=SPEC (repeatable) or set "
            "hemorrhage_candidate in the ini file, one per line"
        )
        metafunc.parametrize("hemorrhage_candidate", [pytest.param(None, marks=skip)], ids=["-"])
        return
    labels = [candidate_label(spec) for spec in specs]
    metafunc.parametrize("hemorrhage_candidate", list(specs), ids=labels, indirect=True)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("hemorrhage") is not None:
        item.config.stash[session_key].budget_for(item)  # bad budgets fail at setup


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outside hypothesis' own wrapper
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    from .explore.hypothesis import hypothesis_call

    with hypothesis_call(item, item.config.stash[session_key]):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if call.excinfo is not None and call.excinfo.errisinstance(HemorrhageError):
        report.longrepr = f"HemorrhageError: {call.excinfo.value}"  # no torch traceback
    if report.when == "call" and report.passed and not hasattr(report, "wasxfail"):
        # measured but never checked: a result worse than the old report's still fails
        lines = item.config.stash[session_key].comparison_failures(item.nodeid)
        if lines:
            report.outcome = "failed"
            report.longrepr = "hemorrhage worse than the compared report:\n  " + "\n  ".join(lines)
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcome = (
            "xfailed"
            if hasattr(report, "wasxfail") and report.skipped
            else ("xpassed" if hasattr(report, "wasxfail") else report.outcome)
        )
        item.config.stash[session_key].set_outcome(item.nodeid, outcome)
    return report


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    session = config.stash[session_key]
    if hasattr(config, "workerinput"):
        return
    for line in session.failures:  # results lost or not plain data: the run failed for them
        terminalreporter.write_line(f"hemorrhage: {line}", red=True, bold=True)
    if not (session.records or session.explorations):
        return
    if session.old_report is not None:
        from .report.comparison import render_comparison

        terminalreporter.write_line("")
        terminalreporter.write(render_comparison(session.report()))
    width, color = config.get_terminal_writer().fullwidth, terminalreporter.hasmarkup
    terminalreporter.write_line("")
    model = session.header.get("model")
    if model:  # which model, and which kind of measure (next tokens or embeddings)
        terminalreporter.write_line(f"hemorrhage model: {model['spec']} ({model['kind']})")
    if session.portable is not None:  # the reference built elsewhere: not all of it is damage
        from .report.describe import drift_notes

        for line in drift_notes(session.report()):
            terminalreporter.write_line(f"hemorrhage: {line}", yellow=True)
    if session.records:
        from .report.terminal import render_results

        verbose = config.get_verbosity() > 0
        terminalreporter.write(
            render_results(session.records, width=width, color=color, verbose=verbose)
        )
    if session.explorations:
        from .report.terminal import render_explorations

        terminalreporter.write(render_explorations(session.explorations, width=width, color=color))


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    state = config.stash[session_key]
    if hasattr(config, "workerinput"):
        config.workeroutput["hemorrhage"] = state.worker_output()
        return
    if state.finish() and session.exitstatus in (0, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if state.settings.save_reference is not None:
        try:
            state.save_reference()
        except HemorrhageError as exc:
            raise pytest.UsageError(str(exc)) from None
    state.write_reports()
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        from .report.markdown import append_step_summary

        append_step_summary(state.report(), os.environ["GITHUB_STEP_SUMMARY"])
    if state.settings.plot and (state.explorations or state.records):
        from .report.plots import write_plots

        write_plots(state.explorations, state.settings.plot, state.records)


class XdistHooks:
    """Hooks that exist only when pytest-xdist is loaded: results travel to the controller,
    which checks that every result a worker's reports announced arrived."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if report.when == "teardown" and hasattr(item.config, "workerinput"):
            # travels with the report (an int); the controller expects as many results
            report.hemorrhage_results = item.config.stash[session_key].counts[item.nodeid]
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        count = getattr(report, "hemorrhage_results", 0)
        if count and not hasattr(self.config, "workerinput"):
            self.config.stash[session_key].announce(report.nodeid, count)

    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        output = getattr(node, "workeroutput", {}).get("hemorrhage")
        self.config.stash[session_key].worker_down(id(node), node.gateway.id, output, error)
