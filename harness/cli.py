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
import signal
import sys
import tempfile
from pathlib import Path

from harness.config import CONF_DIR, GROUPS, list_choices, task_for
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


def run(args: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from harness.config import register_schema
    from harness.infra import launchers, outcomes
    from harness.run import experiment

    try:
        args = [*args, *check_overrides(args)]
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
    return state["code"] if summary is None else summary


def list_groups(args: list[str]) -> int:
    import yaml

    groups = args or [g for g in GROUPS]
    for g in groups:
        if g not in GROUPS:
            return fail(unknown_choice_message("config group", g, list(GROUPS)))
    for g in groups:
        print(f"{g}:")
        for choice in list_choices(g):
            text = (CONF_DIR / g / f"{choice}.yaml").read_text()
            try:
                spec = yaml.safe_load(text) or {}
            except yaml.YAMLError:
                spec = {}
            desc = spec.get("description") if isinstance(spec, dict) else None
            if not desc:  # first comment line that is not a Hydra directive
                desc = next(
                    (
                        ln.lstrip("# ").strip()
                        for ln in text.splitlines()
                        if ln.startswith("#") and "@package" not in ln
                    ),
                    "",
                )
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
        code = fail(unknown_choice_message("command", cmd, ["run", "list", *SUBCOMMANDS]))
    return code


def entry() -> None:
    try:
        sys.exit(main())
    except BrokenPipeError:  # `harness list | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    entry()
