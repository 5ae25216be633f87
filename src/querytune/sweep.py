"""Run a standard W&B sweep file offline with Optuna: `querytune sweep sweeps/X.yaml --trials N`.

The same file works with `wandb sweep` + `wandb agent` against the W&B server. Offline, its `method` picks the
Optuna sampler (grid → GridSampler, random → RandomSampler, bayes → TPESampler), `early_terminate: hyperband`
picks a HyperbandPruner fed by every evaluation, `metric` is the objective, and `command` names the experiment
and any fixed flags. Each trial is an ordinary training with its own run directory and its own W&B run.

A sweep survives failures: the Optuna study lives in `optuna.db` (SQLite) in the sweep directory, so `querytune
sweep ... --resume` continues a killed sweep without re-running finished trials (the trial that was running is
recorded as interrupted and run again); a trial that raises is recorded as failed, with its error, and the sweep
goes on; `sweep_summary.{json,md}` is rewritten after every trial. Secrets passed to a sweep (`--hub_token`, any key
named like a token, key, secret or password) never reach the summary, the study file or any written command.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock, so a sweep directory is not locked against a second process
    fcntl = None

import yaml
from transformers import TrainerCallback

from querytune.config import ConfigError, load_config
from querytune.errors import RunError
from querytune.extras import require
from querytune.runs import CONFIG_FILE, write_json_atomic

logger = logging.getLogger(__name__)

SUPPORTED = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform_values", "log_uniform")
UNSUPPORTED = ("normal", "q_normal", "log_normal", "q_log_normal", "q_log_uniform", "q_log_uniform_values",
               "inv_log_uniform", "inv_log_uniform_values", "beta", "q_beta")  # fmt: skip
METHODS = {"grid", "random", "bayes"}
STUDY_FILE = "optuna.db"
# A key whose last word is token / key / secret / password holds a credential (hub_token, wandb_api_key). Plural
# "tokens" names a count (prompt_num_virtual_tokens, rewrite_max_new_tokens), which a reproduce command needs.
SECRET_NAME = re.compile(r"(^|[_-])(token|key|apikey|secret|password|passwd|credentials?)$", re.IGNORECASE)
REDACTED = "REDACTED"  # shell-safe: commands are written with shlex.join


@dataclass
class Sweep:
    """A parsed W&B sweep file."""

    path: Path
    method: str
    metric: str  # querytune metric key, e.g. eval_accuracy
    goal: str  # maximize | minimize
    parameters: dict[str, dict[str, Any]]
    experiment: str
    fixed_args: list[str] = field(default_factory=list)
    hyperband: dict[str, Any] | None = None
    name: str = "sweep"


def _distribution(name: str, spec: Any, where: str) -> dict[str, Any]:
    """Normalise one W&B parameter spec to {kind, ...}; unsupported kinds are an error that names them."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: parameter {name!r} must be a mapping (value / values / distribution)")
    if "parameters" in spec:
        raise ConfigError(f"{where}: nested parameters ({name!r}) are not supported offline")
    kind = spec.get("distribution")
    if kind is None:  # W&B infers the distribution
        if "value" in spec:
            kind = "constant"
        elif "values" in spec:
            kind = "categorical"
        elif isinstance(spec.get("min"), int) and isinstance(spec.get("max"), int):
            kind = "int_uniform"
        else:
            kind = "uniform"
    if kind in UNSUPPORTED or kind not in SUPPORTED:
        raise ConfigError(
            f"{where}: parameter {name!r} uses distribution {kind!r}, which `querytune sweep` does not support "
            f"offline (supported: {', '.join(SUPPORTED)}). `wandb agent` runs it against the W&B server."
        )
    if kind == "categorical" and "probabilities" in spec:
        raise ConfigError(f"{where}: parameter {name!r}: categorical 'probabilities' are not supported offline")
    if kind in ("int_uniform", "uniform", "q_uniform", "log_uniform_values", "log_uniform"):
        if "min" not in spec or "max" not in spec:
            raise ConfigError(f"{where}: parameter {name!r} ({kind}) needs min and max")
    return {"kind": kind, **spec}


def _command_target(command: list[str], where: str) -> tuple[str, list[str]]:
    """The experiment file and fixed flags from a sweep `command` (`... -m querytune.train EXP [flags] ${args}`)."""
    tokens = [
        t for t in command if t not in ("${env}", "${interpreter}", "${program}", "${args}", "${args_no_hyphens}")
    ]
    for i, tok in enumerate(tokens):
        if tok in ("querytune.train", "train") and i + 1 < len(tokens):
            return tokens[i + 1], tokens[i + 2 :]
    raise ConfigError(f"{where}: `command` must run `-m querytune.train EXPERIMENT.yaml ... ${{args}}`")


def load_sweep(path: str | Path) -> Sweep:
    """Parse and check a W&B sweep file (before any trial runs)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML syntax error: {err}") from err
    method = spec.get("method")
    if method not in METHODS:
        raise ConfigError(f"{path}: method must be one of {sorted(METHODS)}, got {method!r}")
    metric = spec.get("metric") or {}
    if "name" not in metric:
        raise ConfigError(f"{path}: metric.name is required (e.g. eval/accuracy)")
    goal = metric.get("goal", "maximize")
    if goal not in ("maximize", "minimize"):
        raise ConfigError(f"{path}: metric.goal must be maximize or minimize, got {goal!r}")
    params = {name: _distribution(name, p, str(path)) for name, p in (spec.get("parameters") or {}).items()}
    if not params:
        raise ConfigError(f"{path}: no parameters to sweep")
    if method == "grid":
        bad = [n for n, p in params.items() if p["kind"] not in ("constant", "categorical")]
        if bad:
            raise ConfigError(f"{path}: a grid sweep needs `values` for every parameter; {bad} have ranges")
    early = spec.get("early_terminate")
    if early is not None and early.get("type") != "hyperband":
        raise ConfigError(f"{path}: early_terminate type {early.get('type')!r} is not supported (hyperband is)")
    command = spec.get("command")
    if not isinstance(command, list):
        raise ConfigError(f"{path}: `command` (a list) must name the experiment")
    experiment, fixed = _command_target([str(c) for c in command], str(path))
    # W&B logs Trainer metrics as eval/accuracy; querytune's result keys are eval_accuracy.
    key = metric["name"].replace("/", "_")
    return Sweep(path=path, method=method, metric=key, goal=goal, parameters=params, experiment=experiment,
                 fixed_args=fixed, hyperband=early, name=spec.get("name") or path.stem)  # fmt: skip


def suggest(trial, parameters: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Draw one value per parameter with Optuna's trial API."""
    values: dict[str, Any] = {}
    for name, p in parameters.items():
        kind = p["kind"]
        if kind == "constant":
            values[name] = p["value"]
        elif kind == "categorical":
            values[name] = trial.suggest_categorical(name, p["values"])
        elif kind == "int_uniform":
            values[name] = trial.suggest_int(name, int(p["min"]), int(p["max"]))
        elif kind == "uniform":
            values[name] = trial.suggest_float(name, float(p["min"]), float(p["max"]))
        elif kind == "q_uniform":
            values[name] = trial.suggest_float(name, float(p["min"]), float(p["max"]), step=float(p.get("q", 1.0)))
        elif kind == "log_uniform_values":
            values[name] = trial.suggest_float(name, float(p["min"]), float(p["max"]), log=True)
        elif kind == "log_uniform":  # W&B: min/max are natural-log exponents
            values[name] = trial.suggest_float(name, math.exp(p["min"]), math.exp(p["max"]), log=True)
    return values


def _as_flags(values: dict[str, Any]) -> list[str]:
    flags = []
    for name, value in values.items():
        if isinstance(value, list):
            flags += [f"--{name}", *map(str, value)]
        else:
            flags.append(f"--{name}={str(value).lower() if isinstance(value, bool) else value}")
    return flags


class PruningCallback(TrainerCallback):
    """Report every evaluation to Optuna and stop the training when the pruner says so."""

    def __init__(self, trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.pruned = False
        self.step = 0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or self.metric not in metrics:
            return
        self.step += 1
        self.trial.report(float(metrics[self.metric]), step=self.step)
        if self.trial.should_prune():
            self.pruned = True
            control.should_training_stop = True


def _sampler(sweep: Sweep, seed: int):
    import optuna

    if sweep.method == "grid":
        space = {n: (p["values"] if p["kind"] == "categorical" else [p["value"]]) for n, p in sweep.parameters.items()}
        return optuna.samplers.GridSampler(space, seed=seed), math.prod(len(v) for v in space.values())
    if sweep.method == "random":
        return optuna.samplers.RandomSampler(seed=seed), None
    return optuna.samplers.TPESampler(seed=seed), None


def _pruner(sweep: Sweep):
    import optuna

    if not sweep.hyperband:
        return optuna.pruners.NopPruner()
    hb = sweep.hyperband
    return optuna.pruners.HyperbandPruner(
        min_resource=int(hb.get("min_iter", 1)),
        max_resource=hb.get("max_iter", "auto"),
        reduction_factor=hb.get("eta", 3),
    )


def is_secret(name: str) -> bool:
    return bool(SECRET_NAME.search(name.lstrip("-").split("=", 1)[0]))


def redact(tokens: list[str]) -> list[str]:
    """Command-line tokens with the value of every secret flag replaced (`--hub_token X`, `--hub_token=X`)."""
    out: list[str] = []
    hide_next = False
    for tok in tokens:
        if hide_next and not tok.startswith("--"):
            out.append(REDACTED)
        elif tok.startswith("--") and "=" in tok and is_secret(tok):
            out.append(f"{tok.split('=', 1)[0]}={REDACTED}")
        else:
            out.append(tok)
        hide_next = tok.startswith("--") and "=" not in tok and is_secret(tok)
    return out


def _lock(out: Path):
    """One process per sweep directory: an exclusive lock that the OS releases when the process dies."""
    handle = (out / ".sweep.lock").open("w")
    if fcntl is None:
        logger.warning("no file locks on this platform: run one `querytune sweep` per directory")
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunError(f"{out}: another `querytune sweep` is running in this directory") from None
    return handle


def _close_interrupted(study) -> int:
    """Record the trials a killed sweep left running as failed (interrupted) and queue their values again."""
    import optuna

    count = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_user_attr(t._trial_id, "error", "interrupted: the sweep process was stopped")
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        count += 1
    return count


def _done(study) -> int:
    """Trials that count towards `--trials`: finished, pruned or failed (not the interrupted ones, run again)."""
    return sum(1 for t in study.trials if t.state.is_finished() and not t.user_attrs.get("interrupted"))


def open_storage(url: str, heartbeat_s: float):
    """An Optuna RDB storage shared by workers (PostgreSQL, MySQL): a worker that dies mid-trial stops beating, its
    trial is marked failed after two missed beats and run again by another worker (Optuna's
    `RetryHeartbeatStaleTrialCallback`). A bad URL or a server that does not answer is a `RunError` of one line,
    within `CONNECT_TIMEOUT_S`."""
    import optuna
    import sqlalchemy

    try:
        shown = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001  (not even a URL: say so below)
        shown = url.split("@")[-1]
    engine: dict[str, Any] = {"pool_pre_ping": True}
    scheme = url.split("://")[0]
    if scheme in ("postgresql", "postgresql+psycopg"):  # SQLAlchemy 2.1's default PostgreSQL driver: psycopg 3
        require("psycopg", extra="postgres", feature="--storage postgresql://")
    if url.startswith("postgresql"):
        engine["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    elif url.startswith("mysql"):
        engine["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.8: no warning per worker
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=max(1, int(heartbeat_s)),
                grace_period=max(2, int(2 * heartbeat_s)),
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
            )  # fmt: skip
    except Exception as err:  # sqlalchemy raises many kinds; the URL (no password) and the first line say it all
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunError(f"sweep storage {shown}: cannot open it ({type(err).__name__}: {first})") from None


CONNECT_TIMEOUT_S = 10  # a database server that does not answer fails the sweep's start within this


def _retried(study) -> set[int]:
    """Numbers of the failed trials another trial ran again (the retry callback's `failed_trial`)."""
    return {t.system_attrs["failed_trial"] for t in study.get_trials(deepcopy=False)
            if "failed_trial" in t.system_attrs}  # fmt: skip


def _done_shared(study) -> int:
    """Trials that count towards `--trials` in a shared study: finished, pruned or failed, not run again."""
    again = _retried(study)
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.number not in again
               and not t.user_attrs.get("interrupted"))  # fmt: skip


def run_sweep(path: str | Path, trials: int, output_dir: str | Path | None = None, seed: int = 0,
              extra_args: list[str] | None = None, resume: bool = False, storage: str | None = None,
              heartbeat_s: float = 60.0) -> dict[str, Any]:  # fmt: skip
    """Run trials until `trials` have finished, pruned or failed; returns (and writes) the sweep summary with the
    best trial and its config. `resume` continues the sweep stored in `output_dir`.

    `storage`: an Optuna RDB URL (`postgresql://user:password@host/db`) that several workers share, on one machine
    or many: each runs `querytune sweep` with the same file, storage and `--trials`, joins the one study and takes
    trials until `trials` are done; each trial trains into its own `trial-NNN` directory of the worker's
    `--sweep_dir`. Without it, the study is `optuna.db` (SQLite) in the sweep directory: one process."""
    from querytune.train import run

    optuna = require("optuna", extra="sweep", feature="querytune sweep")

    sweep = load_sweep(path)
    out = Path(output_dir or f"runs/sweep-{sweep.name}")
    shared = storage is not None and not storage.startswith("sqlite")
    db = out / STUDY_FILE
    if not shared:
        if resume and not db.is_file():
            raise RunError(f"--resume: no sweep to continue in {out} (no {STUDY_FILE})")
        if not resume and out.is_dir() and any(out.iterdir()):
            what = "a sweep" if db.is_file() else "files"
            raise RunError(f"{out} already holds {what}: continue it with --resume, or choose another --sweep_dir")
    fixed = [*sweep.fixed_args, *(extra_args or [])]
    # Check the experiment and every parameter name up front: a typo must not surface at trial 7.
    probe = {n: (p.get("values") or [p.get("value", p.get("min"))])[0] for n, p in sweep.parameters.items()}
    load_config(sweep.experiment, [*fixed, *_as_flags(probe), "--output_dir", str(out / "probe")])
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out) if not shared else None  # shared storage: workers may share a directory, trial by trial

    direction = "maximize" if sweep.goal == "maximize" else "minimize"
    if shared:
        store: Any = open_storage(storage, heartbeat_s)
        seed += os.getpid()  # workers draw differently; the storage hands out trial numbers
    else:
        store = storage or f"sqlite:///{db.resolve()}"
        if resume:  # a fresh sampler seed, or a random sweep would draw the first trials' values again
            seed += len(optuna.load_study(study_name=sweep.name, storage=store).trials)
    sampler, grid_size = _sampler(sweep, seed)
    study = optuna.create_study(direction=direction, sampler=sampler, pruner=_pruner(sweep), study_name=sweep.name,
                                storage=store, load_if_exists=resume or shared)  # fmt: skip
    done = _done_shared if shared else _done
    if resume and not shared:
        interrupted = _close_interrupted(study)
        logger.info("resuming sweep %s in %s: %d trials done, %d interrupted (run again)", sweep.name, out,
                    _done(study), interrupted)  # fmt: skip
    n_trials = min(trials, grid_size) if grid_size else trials
    if grid_size and trials > grid_size:
        logger.warning("grid has %d points; running %d trials, not %d", grid_size, grid_size, trials)
    remaining = max(0, n_trials - done(study))

    def objective(trial) -> float:
        values = suggest(trial, sweep.parameters)
        trial_dir = out / f"trial-{trial.number:03d}"
        flags = [*fixed, *_as_flags(values), "--output_dir", str(trial_dir),
                 "--run_name", f"{sweep.name}-trial-{trial.number:03d}", "--wandb_group", sweep.name]  # fmt: skip
        trial.set_user_attr("command", shlex.join(["querytune", "train", sweep.experiment, *redact(flags)]))
        trial.set_user_attr("run_dir", str(trial_dir))
        write_summary(study, sweep, out)  # the running trial shows too
        try:
            config = load_config(sweep.experiment, flags)
            pruning = PruningCallback(trial, sweep.metric)
            result = run(config, callbacks=[pruning])
            if sweep.metric not in result.metrics:
                raise ConfigError(
                    f"{sweep.path}: metric {sweep.metric!r} was not produced; have {sorted(result.metrics)}"
                )
        except Exception as err:  # recorded as a failed trial (catch= below); the sweep goes on
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            raise
        if pruning.pruned:
            raise optuna.TrialPruned()
        return float(result.metrics[sweep.metric])

    def after_trial(study, trial) -> None:
        write_summary(study, sweep, out)
        if shared and done(study) >= n_trials:  # the other workers' trials count too
            study.stop()

    try:
        write_summary(study, sweep, out)
        if shared:  # take trials one at a time until the study has its `trials`, whoever ran them
            while done(study) < n_trials:  # (workers that take the last trials at once may run one or two more)
                study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[after_trial])
        elif remaining:
            study.optimize(objective, n_trials=remaining, catch=(Exception,), callbacks=[after_trial])
        return write_summary(study, sweep, out)
    finally:
        if lock is not None:
            lock.close()


def write_summary(study, sweep: Sweep, out: Path) -> dict[str, Any]:
    """sweep_summary.json and .md: every trial (state, value, params, error, run directory, the command that
    reproduces it) and the best one with its full config. Written atomically after every trial."""
    import optuna

    rows = []
    for t in study.trials:
        rows.append({"trial": t.number, "state": t.state.name, "value": t.value, "params": _public(t.params),
                     "intermediate": list(t.intermediate_values.values()), "run_dir": t.user_attrs.get("run_dir"),
                     "command": t.user_attrs.get("command"), "error": t.user_attrs.get("error"),
                     "retry_of": t.user_attrs.get("retry_of", t.system_attrs.get("failed_trial"))})  # fmt: skip
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    summary: dict[str, Any] = {"sweep": str(sweep.path), "method": sweep.method, "metric": sweep.metric,
                               "goal": sweep.goal, "trials": rows, "best": None}  # fmt: skip
    if complete:
        best = study.best_trial
        config_path = Path(best.user_attrs["run_dir"]) / CONFIG_FILE
        config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
        summary["best"] = {
            "trial": best.number,
            "value": best.value,
            "params": _public(best.params),
            "run_dir": best.user_attrs["run_dir"],
            "command": best.user_attrs["command"],
            "config": _public(config) if config else None,
        }
    write_json_atomic(out / "sweep_summary.json", summary)
    lines = [f"# Sweep {sweep.name} ({sweep.method}, {sweep.goal} {sweep.metric})", "",
             "| trial | state | value | params | error |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        value = f"{r['value']:.4f}" if r["value"] is not None else "–"
        error = (r["error"] or "").replace("|", "\\|").replace("\n", " ")[:200]
        lines.append(f"| {r['trial']} | {r['state']} | {value} | `{json.dumps(r['params'])}` | {error} |")
    if summary["best"]:
        b = summary["best"]
        lines += ["", f"**Best: trial {b['trial']}**, {sweep.metric} = {b['value']:.4f}, params "
                  f"`{json.dumps(b['params'])}`; run `{b['run_dir']}`; reproduce with `{b['command']}`."]  # fmt: skip
    tmp = out / "sweep_summary.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "sweep_summary.md")
    return summary


def _public(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (REDACTED if is_secret(k) else v) for k, v in values.items()}
