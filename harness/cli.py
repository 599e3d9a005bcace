"""``harness`` command line: ``run`` hands the rest of argv to Hydra (so ``-m``, ``--cfg job``,
``--help`` and ``hydra/launcher=...`` work as in any Hydra app); the other subcommands are
plain argparse programs in their own modules.

Exit codes: 0 ok, 1 a run failed or diverged (its record is written), 2 bad input (unknown
subcommand, unknown config choice, invalid value, missing data): nothing was run.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import signal
import sys
import tempfile
from pathlib import Path

from harness.config import CONF_DIR, GROUPS, choice_path, list_choices, set_searchpath, task_for
from harness.errors import ConfigError, DataMissingError, InfraFault
from harness.infra.overrides import check_key, check_launcher, check_seed, explain_parse_error
from harness.registry import unknown_choice_message

# subcommand -> "module:function" taking argv and returning an exit code
SUBCOMMANDS = {
    "leaderboard": "harness.analysis.command:cli",
    "plot": "harness.analysis.reliability:cli",
}
USAGE = """usage: harness <command> [args]

commands:
  run [hydra overrides]     train one run (or a sweep with -m); e.g. harness run optimizer=adamp model=resnet18
  study NAME [study.k=v]    tune every arm equally, re-run fresh seeds, compare, verdict (harness study --help)
  list [group]              config groups and their choices (with each technique's paper)
  leaderboard [options]     tables, plots and an HTML report from results/ (harness leaderboard --help)
  plot reliability RUN_DIR  reliability diagram of a run, before/after post-hoc calibration
"""


def fail(message: str, code: int = 2) -> int:
    print(f"harness: error: {message}", file=sys.stderr)
    return code


def check_overrides(args: list[str]) -> None:
    """Reject unknown config choices and unwritable results dirs before Hydra starts, with the
    list of valid choices (Hydra's own message would come with exit code 1 and a traceback hint)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in args if not a.startswith("-") and "=" in a]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # Hydra's grammar errors name the override; huge numbers and non-ASCII get a clearer word
        raise ConfigError(explain_parse_error(overrides, e)) from e
    for o in parsed:  # hydra.searchpath=[file://my_conf]: the user's choices are valid choices
        if o.key_or_group == "hydra.searchpath" and not o.is_delete():
            set_searchpath(list(o.value() or []))
    extra = task_override(parsed)
    results_dir = "results"
    for o in parsed:
        key = o.key_or_group
        if key == "results_dir" and not o.is_sweep_override():
            results_dir = str(o.value())
        if not o.is_delete() and not key.startswith("+") and o.input_line and not o.input_line.startswith("+"):
            check_key(key, groups=not any(x.key_or_group == "hydra.searchpath" for x in parsed))  # did you mean ...?
        if (key.startswith("trainer.") or key == "seed") and not o.is_delete():
            check_type(key, o)
        if key == "seed" and not o.is_delete():
            check_seed(list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()])
        if key == "hydra/launcher" and not o.is_delete():
            check_launcher(o.get_value_element_as_str())
        if key not in GROUPS or o.is_delete():
            continue
        choices = list_choices(key)
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        for v in values:
            if v not in choices:
                raise ConfigError(unknown_choice_message(key, v, choices))
    check_writable(Path(results_dir))
    return extra


def calibrator_lists(args: list[str]) -> list[str]:
    """``calibration=[temperature,vector,isotonic]`` (several post-hoc calibrators on one trained model) is
    ``calibration=compare calibration.methods=[temperature,vector,isotonic]``: one config node that lists
    the methods, each built from its own YAML (Hydra would merge a list of choices into one node)."""
    out = []
    for a in args:
        key, _, value = a.partition("=")
        if key == "calibration" and value.strip().startswith("["):
            out += ["calibration=compare", f"calibration.methods={value}"]
        else:
            out.append(a)
    return out


def sweep_dir_overrides(args: list[str]) -> list[str]:
    """A sweep's job directories are named by its swept keys (``3_small_cnn_digits_normalization=skipinit,seed=1``):
    the overrides that are not swept are excluded from ``hydra.job.override_dirname``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not {"-m", "--multirun"} & set(args):
        return []
    given = [a for a in args if "override_dirname.exclude_keys" in a]  # e.g. from a printed continue command
    parsed = OverridesParser.create().parse_overrides(
        [a for a in args if not a.startswith("-") and "=" in a and a not in given]
    )
    fixed = {o.key_or_group for o in parsed if not o.is_sweep_override() and not o.key_or_group.startswith("hydra")}
    for a in given:  # keep what the user excluded, add what this command line fixes
        fixed |= {k.strip() for k in a.split("=", 1)[1].strip("[]").split(",") if k.strip()}
    fixed = sorted(fixed | {"sweep.skip_completed"})  # continuing a sweep keeps its job directories
    return [f"hydra.job.config.override_dirname.exclude_keys=[{','.join(fixed)}]"] if fixed else []


def task_override(parsed) -> list[str]:
    """``task=NAME`` for a command line that names no task: the task registered for its model x dataset
    pair (the defaults: resnet18 x cifar10). Raises ConfigError when there is none."""
    from omegaconf import OmegaConf

    if any(o.key_or_group == "task" for o in parsed):
        return []
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml").defaults)
    pair = {k: next(d[k] for d in defaults if isinstance(d, dict) and k in d) for k in ("model", "dataset")}
    for o in parsed:
        if o.key_or_group in pair and not o.is_delete():
            if o.is_sweep_override():
                raise ConfigError(
                    f"{o.input_line}: a sweep over {o.key_or_group}s needs the tasks named, e.g. task=quickstart,vit_tiny_digits "
                    "(each task brings its own budget and target)"
                )
            pair[o.key_or_group] = o.get_value_element_as_str()
    return [f"task={task_for(pair['model'], pair['dataset'])}"]


def check_type(key: str, override) -> None:
    """Type-check values of the typed schema (``trainer.epochs=abc``) before any work."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from harness.config import RootConfig

    schema = OmegaConf.structured(RootConfig)
    values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
    for v in values:
        try:
            OmegaConf.update(schema, key, v, merge=True)
        except OmegaConfBaseException as e:
            reason = str(e).splitlines()[0]
            raise ConfigError(f"{key}={v!r} is invalid: {reason}") from e


def check_writable(path: Path) -> None:
    """The nearest existing folder of ``path`` must accept a new folder (os.access alone says yes to
    root on read-only mounts such as /proc)."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise OSError(f"{probe} is not a directory")
        os.rmdir(tempfile.mkdtemp(prefix=".harness-write-check-", dir=probe))
    except OSError as e:
        raise ConfigError(f"results_dir={path} is not writable ({probe}: {e.strerror or e})") from e


def _stop_sweep(signum, frame) -> None:
    raise SystemExit(128 + signum)


def run(args: list[str], study: bool = False) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from harness.config import register_schema
    from harness.infra import launchers, outcomes
    from harness.run import experiment

    args = calibrator_lists(args)
    try:
        extra = check_overrides(args)
        args = args if study else [*args, *extra]  # a study names its task in each of its runs
        if not study:
            extra_dir = sweep_dir_overrides(args)
            args = [a for a in args if "override_dirname.exclude_keys" not in a] + extra_dir
    except ConfigError as e:
        return fail(str(e))
    register_schema()
    launchers.register_plugins()  # hydra/launcher=local|slurm: every job waited for and listed
    from harness.infra import distributed

    if distributed.env_world_size() > 1:  # torchrun: join the process group, agree on one run dir
        try:
            distributed.init_from_env()
        except ConfigError as e:
            return fail(str(e))
        args = [*args, *distributed.hydra_overrides(args, distributed.run_dir_pattern())]
    state = {"code": 0}

    def task(cfg):
        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        run_dir = Path(hc.runtime.output_dir)
        choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra") and v is not None}
        overrides = list(hc.overrides.task)
        if multirun:  # every outcome (ok, refused, failed, ...) is noted; the other jobs run; a summary at the end
            return outcomes.run_sweep_job(lambda: experiment.execute(cfg, run_dir, choices, overrides), run_dir)
        try:
            return experiment.execute(cfg, run_dir, choices, overrides)
        except (ConfigError, DataMissingError) as e:
            print(f"harness: error: {e}", file=sys.stderr)
            state["code"] = 2
        except experiment.RunFailed as e:
            print(f"harness: {e}", file=sys.stderr)
            state["code"] = 1
        except InfraFault as e:  # the record could not be written either: say why, plainly
            print(f"harness: error: {e}; earlier records and checkpoints are intact", file=sys.stderr)
            state["code"] = 1

    sys.argv = ["harness run", *args]
    main = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(task)
    outcomes.CURRENT.clear()
    if {"-m", "--multirun"} & set(args):  # SIGTERM between two runs too: stop, list the jobs, say how to continue
        signal.signal(signal.SIGTERM, _stop_sweep)
    try:
        main()
    except SystemExit as e:  # Hydra reports an aborted sweep with exit 1; SIGTERM ends a run with 143
        code = e.code if isinstance(e.code, int) else 1
        summary = outcomes.report(args, interrupted=code if code >= 128 else None)
        raise SystemExit(summary if summary else code) from None
    finally:
        distributed.shutdown()
    summary = outcomes.report(args)  # a multirun: one line per job, non-zero unless every job succeeded
    if study:  # the study's report accounts for every run (failed trials included): done when it is written
        from harness.study import runner

        return 0 if runner.LAST_RESULT else (summary or 1)
    return state["code"] if summary is None else summary


STUDY_USAGE = """usage: harness study NAME [study.KEY=VALUE ...] [overrides ...]

Runs the study conf/study/NAME.yaml: every arm (the baseline too) gets study.budget tuning trials,
each arm's configuration is selected on the validation split, re-run with study.seeds fresh seeds and
compared with the baseline; the verdict and report go to <results_dir>/studies/<name>/.
Completed runs are reused. Other overrides (hydra/launcher=slurm, data_dir=..., results_dir=...)
apply to every run. harness list study lists the studies."""


def study(args: list[str]) -> int:
    """``harness study NAME [study.k=v ...] [overrides]``: check the study, then run it through Hydra's
    multirun with the study sweeper."""
    from harness.study.plan import check_study
    from harness.study.spec import load

    if not args or args[0] in ("-h", "--help"):
        print(STUDY_USAGE)
        return 0 if args else 2
    name, rest = args[0], [a for a in args[1:] if a not in ("-m", "--multirun")]
    study_overrides = [a for a in rest if a.lstrip("+").startswith("study.")]
    other = [a for a in rest if a not in study_overrides]
    try:
        spec = load(name, study_overrides)
        check_overrides(other)
        for arm in spec.arms:  # every arm's choices exist, then every arm composes and its search space is valid
            check_overrides([f"task={spec.task}", *spec.overrides, *arm.overrides])
        check_study(spec, [o for o in other if o.split("=")[0].lstrip("+") in ("data_dir", "results_dir", "seed")])
    except ConfigError as e:
        return fail(str(e))
    results_dir = next((a.split("=", 1)[1] for a in other if a.startswith("results_dir=")), "results")
    unmet = spec.unmet_requirement()
    if unmet:  # the claim's report says why it was not run, and gives no verdict
        from harness.study.report import write_not_run

        path = write_not_run(spec, unmet, Path(results_dir) / "studies" / spec.name)
        return fail(f"study {spec.name} not run: {unmet} (report: {path})")
    argv = [
        "-m",
        f"study={name}",
        *("++" + o.lstrip("+") for o in study_overrides),  # composes whether or not the key is at the top level
        "hydra/sweeper=harness_study",
        f"hydra.sweep.dir={results_dir}/studies/{spec.name}/runs",
        *other,
    ]
    return run(argv, study=True)


def leading_comment(text: str) -> str:
    """The first comment block of a YAML (Hydra directives skipped), up to its first full sentence."""
    block: list[str] = []
    for ln in text.splitlines():
        if ln.startswith("#") and "@package" not in ln:
            block.append(ln.lstrip("# ").strip())
        elif block:
            break
    joined = " ".join(block)
    end = re.search(r"(?<!\bal)(?<!e\.g)(?<!i\.e)\.(?=\s+[A-Z`]|$)", joined)  # not "et al." nor "e.g."
    return joined[: end.start() + 1] if end else joined


def list_groups(args: list[str]) -> int:
    import yaml

    paths = [
        a for a in args if a.startswith("hydra.searchpath=")
    ]  # harness list optimizer hydra.searchpath=[file://my_conf]
    args = [a for a in args if a not in paths]
    try:
        check_overrides(paths)
    except ConfigError as e:
        return fail(str(e))
    groups = args or [g for g in GROUPS]
    for g in groups:
        if g not in GROUPS:
            return fail(unknown_choice_message("config group", g, list(GROUPS)))
    for g in groups:
        print(f"{g}:")
        for choice in list_choices(g):
            text = choice_path(g, choice).read_text()
            try:
                spec = yaml.safe_load(text) or {}
            except yaml.YAMLError:
                spec = {}
            desc = spec.get("description") if isinstance(spec, dict) else None
            if not desc and isinstance(spec, dict) and isinstance(spec.get("task"), dict):  # a task's own description
                desc = spec["task"].get("description")
            if not desc:
                desc = leading_comment(text)
            paper = spec.get("paper", "") if isinstance(spec, dict) else ""
            line = f"  {choice:<22} {desc}"
            if paper and paper not in desc:
                line += f"  [{paper}]"
            if g == "optimizer" and isinstance(spec, dict):  # tests/test_conformance.py checks each claim
                ref = spec.get("checked_against")
                line += f"  (checked against {ref})" if ref else "  (unchecked)"
            print(line.rstrip())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    if cmd == "run":
        code = run(rest)
    elif cmd == "study":
        code = study(rest)
    elif cmd == "list":
        code = list_groups(rest)
    elif cmd in SUBCOMMANDS:
        module, func = SUBCOMMANDS[cmd].split(":")
        try:
            fn = getattr(importlib.import_module(module), func)
        except ModuleNotFoundError as e:
            return fail(f"subcommand {cmd!r} is not available in this installation ({e})")
        try:
            code = fn(rest)
        except (ConfigError, DataMissingError) as e:
            code = fail(str(e))
    else:
        code = fail(unknown_choice_message("command", cmd, ["run", "study", "list", *SUBCOMMANDS]))
    return code


def entry() -> None:
    try:
        sys.exit(main())
    except BrokenPipeError:  # `harness list | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    entry()
