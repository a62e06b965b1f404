"""Run settings, declared once.

Every flag is a field of a frozen dataclass, declared with `setting()` beside the code it
configures (the optimizer's in engine/optim.py, the model's in models/build.py, a task's in its
task.py): its type is the annotation, and the declaration gives its default, help, bounds and
roles. A script composes those classes into one (train.py's TrainSettings), and everything else is
derived from the fields:

- the command line (`parser`), one argument group per declaring class;
- `--config FILE` (YAML or JSON, flag names as keys, the command line winning over the file);
- the OUTPUT_DIR/config.yaml every run writes (`write_config`), and the settings saved in
  checkpoints and results.json (`as_saved`);
- the resume check (`changed_trajectory`) and TensorBoard's HParams list (`with_role`).

Values a script resolves later (the automatic learning rate, the global batch) are not written back
into the settings: they live in a dataclass of their own, whose fields may carry roles too, and
`as_saved` records them beside the flags.
"""
import argparse
import dataclasses
import inspect
import json
import types
import typing
from pathlib import Path

import yaml

from engine.errors import UserError
from engine.files import atomic_write_text

TRAJECTORY = "trajectory"  # shapes the optimisation: a resumed run must keep it
HPARAM = "hparam"  # compared across runs in TensorBoard's HParams dashboard
AUTO = "auto"  # the flag's value `auto` is None in the settings: the code decides


NOT_GIVEN = object()


def setting(default, help: str, *, choices: tuple | None = None, at_least: float | None = None,
            between: tuple[float, float] | None = None, auto: bool = False, roles: tuple[str, ...] = (),
            bare=None, recorded: bool = True, before=NOT_GIVEN):
    """A flag: `choices` (for a tuple, of each element), bounds (`at_least`, `between`), `auto` (the
    value `auto`, meaning None, is accepted), `roles` (TRAJECTORY, HPARAM), `bare` (the value when the
    flag is given alone, as `--resume`), `recorded` (False: not part of what a run is, so not saved),
    `before` (how runs behaved before the flag existed, where its default changed that: a checkpoint
    that predates the flag is compared with it)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "at_least": at_least, "between": between, "auto": auto, "roles": roles,
        "bare": bare, "recorded": recorded, "before": default if before is NOT_GIVEN else before})


def settings_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def with_role(cls, role: str) -> list[str]:
    """Names of the fields of `cls` (settings or resolved values) that have `role`."""
    return [f.name for f in dataclasses.fields(cls) if role in f.metadata.get("roles", ())]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value_type(cls, field: dataclasses.Field):
    """The annotation without its `| None`: bool, int, float, str, Path, or tuple (of str)."""
    annotation = typing.get_type_hints(cls)[field.name]
    if isinstance(annotation, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_origin(annotation) or annotation


def converter(value_type, field: dataclasses.Field):
    """Text (from the command line or a config file) -> the field's value, or ArgumentTypeError."""
    meta = field.metadata

    def convert(text: str):
        if meta["auto"] and text == AUTO:
            return None
        try:
            value = tuple(n.strip() for n in text.split(",") if n.strip()) if value_type is tuple else value_type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {value_type.__name__} value: {text!r}") from None
        for item in value if value_type is tuple else (value,):
            if meta["choices"] is not None and item not in meta["choices"]:
                raise argparse.ArgumentTypeError(f"invalid choice: {item!r} (choose from {', '.join(meta['choices'])})")
        if meta["at_least"] is not None and value < meta["at_least"]:
            raise argparse.ArgumentTypeError(f"must be at least {meta['at_least']}, got {text}")
        if meta["between"] is not None and not meta["between"][0] <= value <= meta["between"][1]:
            raise argparse.ArgumentTypeError(f"must be between {meta['between'][0]} and {meta['between'][1]}, got {text}")
        return value

    convert.__name__ = value_type.__name__  # argparse names the type in some messages
    return convert


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help, unless the help says it; the description as written."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """A mistake on the command line is a UserError: one line, reported by run_cli (once under torchrun)."""

    def error(self, message):
        raise UserError(message)


def parser(cls, description: str, as_trained: tuple[type, ...] = ()) -> Parser:
    """The command line of `cls`: one argument group per class that declares fields, in the order
    of its bases. The fields of the `as_trained` classes default to the checkpoint's values (None
    here; `trained` fills them in)."""
    p = Parser(description=description, formatter_class=HelpFormatter)
    declared, trained_names = set(), {f.name for klass in as_trained for f in dataclasses.fields(klass)}
    for klass in cls.__mro__:
        own = [f for f in settings_fields(klass) if f.name in inspect.get_annotations(klass)
               and f.name not in declared] if dataclasses.is_dataclass(klass) else []
        if not own:
            continue
        group = p.add_argument_group((klass.__doc__ or klass.__name__).strip().splitlines()[0])
        for field in own:
            declared.add(field.name)
            meta, value_type = field.metadata, _value_type(cls, field)
            default = AUTO if meta["auto"] and field.default is None else field.default
            if value_type is tuple:
                default = ",".join(default)
            help = meta["help"]
            if field.name in trained_names:
                default, help = None, f"{help} (default: as trained)"
            options = {"default": default, "help": help.replace("%", "%%")}
            if value_type is bool:
                options["action"] = argparse.BooleanOptionalAction
            else:
                options["type"] = converter(value_type, field)
                if meta["choices"] is not None:
                    options["metavar"] = "{" + ",".join(meta["choices"]) + "}" + ("[,...]" if value_type is tuple else "")
                if meta["bare"] is not None:
                    options.update(nargs="?", const=meta["bare"])
            group.add_argument(flag(field.name), dest=field.name, **options)
    return p


def parse(cls, argv: list[str], description: str, as_trained: tuple[type, ...] = ()):
    """`cls` from the command line. When `cls` has a `config` field, the flags of the `--config` file
    come first, so that the command line's win."""
    p = parser(cls, description, as_trained)
    argv = list(argv)
    if "config" in {f.name for f in settings_fields(cls)}:
        config_only = argparse.ArgumentParser(add_help=False)
        config_only.add_argument("--config", type=Path)
        config = config_only.parse_known_args(argv)[0].config
        if config:
            argv = config_argv(p, read_config(config), config) + argv
    namespace = p.parse_args(argv)
    return cls(**{f.name: getattr(namespace, f.name) for f in settings_fields(cls)})


def trained(cls, settings, run_config: dict):
    """`cls` (an `as_trained` class) as a checkpoint runs: each flag as given, else as the checkpoint's
    run configuration saved it, else its default (a base model, or a checkpoint older than the flag)."""
    def value(field: dataclasses.Field):
        given = getattr(settings, field.name)
        return given if given is not None else run_config.get(field.name, field.default)

    return cls(**{f.name: value(f) for f in settings_fields(cls)})


def read_config(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--config {path}: cannot read it ({getattr(error, 'strerror', None) or error})") from None
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise UserError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {first_line}") from None
    if values is None:  # an empty file
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected flag names mapped to values (learning_rate: 3e-4), "
                        f"got a {type(values).__name__}")
    return values


def config_argv(p: argparse.ArgumentParser, values: dict, path: Path) -> list[str]:
    """The command-line arguments that say what a config file says; a key that is not a flag, or a
    value its flag refuses, is one error line naming the file and the key."""
    known = {action.dest: action for action in p._actions
             if action.option_strings and action.dest != "config" and not isinstance(action, argparse._HelpAction)}
    argv = []
    for key, value in values.items():
        action = known.get(str(key).replace("-", "_"))
        if action is None:
            raise UserError(f"{path}: unknown key {key!r}: keys are the flags without their dashes "
                            "(learning_rate, batch_size; --help lists them)")
        if value is None:  # the flag's default
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise UserError(f"{path}: key {key!r} is a switch: true or false, got {value!r}")
            argv.append(action.option_strings[0 if value else 1])  # --name or --no-name
            continue
        if isinstance(value, list):  # comma-separated flags (freeze: [embeddings, encoder])
            value = ",".join(map(str, value))
        if isinstance(value, (bool, dict)):
            raise UserError(f"{path}: key {key!r} takes one value, got {value!r}")
        try:
            action.type(str(value))
        except argparse.ArgumentTypeError as error:
            raise UserError(f"{path}: key {key!r}: {error}") from None
        argv += [action.option_strings[0], str(value)]
    return argv


def _plain(value):
    """A value as results.json and checkpoints keep it (a tuple as comma-separated text)."""
    return ",".join(value) if isinstance(value, tuple) else str(value) if isinstance(value, Path) else value


def as_saved(settings, resolved=None) -> dict:
    """The run's recorded flags, with the values `resolved` holds in place of theirs (a learning rate
    chosen by `auto`) and its other values beside them (the global batch)."""
    values = {f.name: getattr(settings, f.name) for f in settings_fields(settings) if f.metadata["recorded"]}
    if resolved is not None:
        values.update(dataclasses.asdict(resolved))
    return {name: _plain(value) for name, value in values.items()}


def changed_trajectory(saved: dict, settings, resolved) -> list[str]:
    """How the settings that shape the trajectory differ from those a checkpoint saved, one
    `--flag saved -> now` (or the resolved value's description) per difference."""
    now = as_saved(settings, resolved)
    names = with_role(type(settings), TRAJECTORY) + with_role(type(resolved), TRAJECTORY)
    labels = {f.name: f.metadata.get("label", flag(f.name)) for f in dataclasses.fields(resolved)}
    # A flag newer than the checkpoint: the run behaved as the flag's `before` value (its default, unless that changed).
    fields = {f.name: f for f in settings_fields(settings)}
    saved = {**{name: _plain(f.metadata["before"]) for name, f in fields.items()}, **saved}

    def shown(name: str, value) -> str:  # `auto` as the command line spells it
        return AUTO if value is None and name in fields and fields[name].metadata["auto"] else str(value)

    return [f"{labels.get(name, flag(name))} {shown(name, saved.get(name))} -> {shown(name, now[name])}"
            for name in dict.fromkeys(names) if saved.get(name) != now[name]]


CONFIG_FILE = "config.yaml"


def write_config(directory: Path, settings, resolved) -> None:
    """OUTPUT_DIR/config.yaml: every recorded flag as the run resolved it, so that `--config` with it
    runs the same again (lists as YAML lists)."""
    fields = {f.name: f for f in settings_fields(settings) if f.metadata["recorded"]}
    values = {name: getattr(settings, name) for name in fields}
    values.update({name: value for name, value in dataclasses.asdict(resolved).items() if name in values})
    # None is `auto` where the flag takes it (--hidden-dropout auto): read back, null would be the default.
    values = {name: list(value) if isinstance(value, tuple) else AUTO if value is None and fields[name].metadata["auto"]
              else value for name, value in values.items()}
    atomic_write_text(Path(directory) / CONFIG_FILE,
                      "# written by train.py: every flag as this run resolved it; run it again with\n"
                      "# python train.py --config THIS_FILE --output-dir NEW_DIR\n"
                      + yaml.safe_dump(values, sort_keys=False))
