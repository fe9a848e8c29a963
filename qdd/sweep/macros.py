"""W&B's command macros (``${args}``, ``${envvar:NAME}``, ...) expanded as its agent does."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from qdd.errors import QddError

#: W&B's argument macros (a whole command element) that pass the parameters.
ARGS_MACROS = ("args", "args_no_equals", "args_no_boolean_flags", "args_json", "args_json_file")
#: W&B's macros that qdd-cli fit cannot read, with what to write instead.
REFUSED_MACROS = {
    "args_no_hyphens": "qdd-cli fit reads --name=value, not name=value",
    "args_append_hydra": "qdd-cli fit is not a Hydra program (+name=value)",
    "args_override_hydra": "qdd-cli fit is not a Hydra program (++name=value)",
}
KNOWN_MACROS = (
    ", ".join(
        "${" + m + "}" for m in ("env", "interpreter", "program", *ARGS_MACROS, *REFUSED_MACROS)
    )
    + ", ${envvar:NAME}"
)
MACRO = re.compile(r"\$\{([^}]*)\}")
ENVVAR = re.compile(r"\$\{envvar:([A-Z0-9_]*)\}")


def config_error(path: Path | str, message: str) -> QddError:
    """A sweep config's error, in one line naming the config."""
    return QddError(f"{path}: {message}")


def _flag_values(params: dict[str, Any]) -> dict[str, list[str]]:
    """W&B's agent's renderings of the parameters (``str(value)``, as it formats them)."""
    flags: dict[str, list[str]] = {m: [] for m in ARGS_MACROS}
    for name, value in params.items():
        flags["args"].append(f"--{name}={value}")
        flags["args_no_equals"] += [f"--{name}", str(value)]
        if isinstance(value, bool):
            flags["args_no_boolean_flags"] += [f"--{name}"] if value else []
        else:
            flags["args_no_boolean_flags"].append(f"--{name}={value}")
    flags["args_json"] = [json.dumps(params, default=str)]
    return flags


def _may_be_boolean(spec: dict[str, Any]) -> bool:
    candidates = spec.get("values", [spec.get("value")])
    return any(isinstance(v, bool) for v in candidates)


def expand_command(
    config: dict[str, Any], params: dict[str, Any], trial_dir: Path, path: Path
) -> list[str]:
    """The arguments after ``qdd-cli fit`` for one trial, every W&B macro expanded.

    As W&B's agent: ``${env}`` and ``${interpreter}`` before the program are how it is
    started (a trial is always a fresh ``python -m qdd``), ``${program}`` is ``program:``,
    ``${args}`` is ``--name=value`` per parameter, ``${args_no_equals}`` ``--name value``,
    ``${args_no_boolean_flags}`` ``${args}`` with true booleans as bare flags and false ones
    left out, ``${args_json}`` the parameters as one JSON object and ``${args_json_file}``
    a file holding it (``trial_dir/params.json``: both only after ``--config``, which reads
    them as a config of dotted keys, down to an option such as ``model.lr``: deeper names
    such as ``data.source_weights.fp4`` are refused there), ``${envvar:NAME}`` the
    variable's value. Anything else is refused (`QddError`), with what to write instead.
    """
    command = config.get("command")
    if not isinstance(command, list) or not command:
        raise config_error(path, "no `command:`: it must run `qdd-cli fit ... ${args}`")
    program = config.get("program")
    expanded: list[str] = []
    for element in (str(c) for c in command):
        for name in ENVVAR.findall(element):
            if name not in os.environ:
                raise config_error(path, f"command uses ${{envvar:{name}}} but {name} is not set")
            element = element.replace(f"${{envvar:{name}}}", os.environ[name])
        macros = MACRO.findall(element)
        if not macros:
            expanded.append(element)
            continue
        macro = macros[0]
        if element != f"${{{macro}}}":
            raise config_error(
                path,
                f"command element {element!r}: W&B expands a macro only as a "
                "whole element; write it as its own list item",
            )
        if macro in ("env", "interpreter"):
            if expanded:
                raise config_error(path, f"${{{macro}}} belongs before the program in `command:`")
        elif macro == "program":
            if not program:
                raise config_error(path, "command uses ${program} but the sweep has no `program:`")
            expanded.append(str(program))
        elif macro in REFUSED_MACROS:
            raise config_error(path, f"${{{macro}}}: {REFUSED_MACROS[macro]}; use ${{args}}")
        elif macro not in ARGS_MACROS:
            raise config_error(
                path,
                f"unknown macro ${{{macro}}} in `command:` (W&B defines {KNOWN_MACROS})",
            )
        else:
            expanded.append(element)
    if len(expanded) < 2 or Path(expanded[0]).name != "qdd-cli" or expanded[1] != "fit":
        raise config_error(
            path,
            f"command must run `qdd-cli fit ... ${{args}}` (found {' '.join(expanded) or 'none'})",
        )
    arguments = expanded[2:]
    used = [m for m in ARGS_MACROS if f"${{{m}}}" in arguments]
    if not used:
        raise config_error(path, "command has no ${args}: trials could not set their parameters")
    if any(a == "--out" or a.startswith("--out=") for a in arguments) or "out" in params:
        raise config_error(
            path, "--out is set per trial by qdd-cli sweep (DIR/trial-NNN): remove it"
        )
    for macro in ("args_json", "args_json_file"):
        at = [i for i, a in enumerate(arguments) if a == f"${{{macro}}}"]
        if any(i == 0 or arguments[i - 1] != "--config" for i in at):
            raise config_error(
                path,
                f"${{{macro}}} must follow --config (`- --config` then "
                f"`- ${{{macro}}}`): qdd-cli fit reads the parameters' JSON as a config",
            )
    deep = [n for n in config.get("parameters") or {} if n.count(".") >= 2]
    if deep and {"args_json", "args_json_file"} & set(used):
        raise config_error(
            path,
            f"${{{used[-1]}}} passes {deep[0]} as a --config key, and qdd-cli fit reads config "
            "keys down to an option (model.lr), not into a dict option's entries "
            "(data.source_weights.fp4): use ${args}",
        )
    if "args_no_boolean_flags" in used and any(
        _may_be_boolean(spec) for spec in (config.get("parameters") or {}).values()
    ):
        raise config_error(
            path,
            "${args_no_boolean_flags} passes true booleans as bare flags, and "
            "qdd-cli fit's options take a value (--name=true): use ${args}",
        )
    flags = _flag_values(params)
    flags["args_json_file"] = [str(trial_dir / "params.json")]
    out: list[str] = []
    for argument in arguments:
        name = argument[2:-1] if argument.startswith("${") else None
        out += flags[name] if name in flags else [argument]
    return out
