"""``megalong train RECIPE [key.sub=value ...]``: run a training recipe.

Launch one process per device with torchrun or srun (the environment tells each process
its rank); a single process runs without a launcher. Exit code 0 = finished,
3 = stopped by a signal or the time limit after saving a checkpoint (requeue me).
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="YAML recipe (see examples/prolong/*.yaml, examples/tiny_cpu.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="override recipe values, e.g. optimizer.lr=5e-6 parallel.tensor_parallel=2")
    parser.add_argument("--exit-duration-minutes", type=float, default=None,
                        help="save and exit with code 3 after this many minutes (runtime.exit_duration_minutes)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration and exit without training; values the "
                             "recipe and overrides leave to the defaults end with '# default'")
    parser.add_argument("--check", action="store_true",
                        help="validate the recipe as training would (layout, model, batch sizes, datasets, "
                             "initial weights) and exit without training")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --check: the number of processes to check the layout for "
                             "(default: the launcher's, else 1)")


def run(args: argparse.Namespace) -> int:
    from megalong.checkpoint.weights import CheckpointMismatchError
    from megalong.config import ConfigError, load
    from megalong.runtime.distributed import read_launch_env, shutdown
    from megalong.training import RunConfig, train
    from megalong.training.checkpoint import CheckpointError

    overrides = list(args.overrides)
    if args.exit_duration_minutes is not None:
        overrides.append(f"runtime.exit_duration_minutes={args.exit_duration_minutes}")
    try:
        config = load(RunConfig, args.recipe, overrides)
    except ConfigError as err:
        log.error("%s", err)
        return 2
    if args.print_config:
        try:
            print(_config_with_defaults_marked(config, args.recipe, overrides), end="")
        except ConfigError as err:
            log.error("%s", err)
            return 2
        return 0
    if args.check:
        return _check(config, args.world_size)
    try:
        return train(config)
    except ConfigError as err:
        # The configuration is the same on every rank, so is this error: say it once.
        if read_launch_env().rank == 0:
            log.error("%s", err)
        return 2
    except (FileNotFoundError, CheckpointMismatchError) as err:
        log.error("%s", err)  # may differ per rank: each rank's line carries its rank
        return 2
    except CheckpointError as err:  # a save that failed or a damaged checkpoint: the message says all
        log.error("%s", err)
        return 1
    finally:
        shutdown()


def _check(config, world_size) -> int:
    from megalong.config import ConfigError
    from megalong.training import preflight

    try:
        launch, model, _ = preflight(config, world_size)
    except (ConfigError, FileNotFoundError, RuntimeError) as err:
        log.error("%s", err)
        return 2
    world_size = launch.world_size
    print(f"OK: {config.name}: {config.parallel.describe(world_size)}; {model.preset or 'model'} with "
          f"{model.num_layers} layers at {config.data.seq_length:,} tokens; "
          + ("data from " + config.data_factory if config.data_factory else
             f"{len(config.data.mixture_spec().domains)} data domain(s) found"))
    return 0


def _config_with_defaults_marked(config, recipe: str, overrides: list[str]) -> str:
    """The run's YAML with the model's preset filled in (as training starts with it);
    values from the preset say so, values from the dataclass defaults say ``# default``."""
    import dataclasses

    from megalong.config import ConfigError, dump_yaml
    from megalong.config.loader import load_given
    from megalong.model import presets

    try:
        model = presets.resolve(config.model)
    except presets.UnknownPresetError as err:
        raise ConfigError(f"{recipe}: model.preset: {err}") from None
    notes = {f"model.{f.name}": f"from preset {config.model.preset}" for f in dataclasses.fields(model)
             if getattr(config.model, f.name) is None and getattr(model, f.name) is not None}
    return dump_yaml(dataclasses.replace(config, model=model), given=load_given(recipe, overrides), notes=notes)
