"""``kservice config check|show|reference``, and the configuration reference (docs/configuration.md)."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

import click

from .._config import Config
from .._plugins import get_plugin_manager

if TYPE_CHECKING:
    pass

from ._group import _CONFIG_OPTION_HELP, _Group, _one_line, cli

# --------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------


@cli.group("config", cls=_Group)
def config_group() -> None:
    """Check a configuration file, show the effective configuration, print the reference.

    \b
    Example:
      kservice config check services.yaml
      kservice config show -c services.yaml
      kservice config reference > docs/configuration.md
    """


@config_group.command("check")
@click.argument("path", type=click.Path(dir_okay=False), required=False)
@click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None, help="The file to check (as PATH)."
)
@click.option(
    "--import",
    "import_modules",
    is_flag=True,
    help="Import each service's module to check its class (runs the module's top-level code); "
    "without it, modules are only found and read.",
)
def config_check_command(path: str | None, config_path: str | None, import_modules: bool) -> None:
    """Find everything in PATH (or -c FILE, like every other command) that would fail when its services start.

    Checks the schema of the core and every installed plugin, task kinds and
    transports against the registered ones, class paths (the module is found
    and its source read, without running it; --import imports it instead),
    service entry points, plugins.require, and plugins.disable (a name close
    to an installed plugin's is an error; a name of no installed plugin, a
    note). Prints 'ok' and the services it
    declares; otherwise one line per problem, each naming its key path and the
    closest valid key or name, and exit status 1. With neither PATH nor -c, the
    file named by KSERVICE_CONFIG is checked.

    \b
    Example:
      kservice config check -c services.yaml
      kservice config check services.yaml
      kservice config check --import services.yaml
    """
    if path is not None and config_path is not None and path != config_path:
        raise click.UsageError(f"two files given ({path} and -c {config_path}): check one at a time")
    path = path or config_path or os.environ.get("KSERVICE_CONFIG")
    if not path:
        raise click.UsageError("no file to check: give one with -c FILE (or as PATH, or in KSERVICE_CONFIG)")
    from .._config import check_config

    config, problems, notes = check_config(path, import_modules=import_modules)
    for note in notes:
        click.echo(f"note: {_one_line(note)}", err=True)
    if problems:
        for problem in problems:
            click.echo(f"error: {_one_line(problem)}", err=True)
        sys.exit(1)
    names = config.service_names()
    described = ", ".join(f"{n} ({(config.service_entry(n) or {}).get('kind', 'local')})" for n in names) or "none"
    click.echo(f"ok: {path} is valid; services: {described}")


@config_group.command("show")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None, help=_CONFIG_OPTION_HELP)
def config_show_command(config_path: str | None) -> None:
    """Print the effective configuration as YAML: the file's values with every default filled in.

    \b
    Example:
      kservice config show
      kservice config show -c services.yaml > effective.yaml
    """
    import yaml

    config = Config.load(config_path)
    click.echo(f"# effective configuration from {config.source}")
    click.echo(yaml.safe_dump(config.as_dict(), sort_keys=False, default_flow_style=False).rstrip())


@config_group.command("reference")
@click.option(
    "--builtin",
    is_flag=True,
    help="Only the core and the plugins shipped with kservice (how docs/configuration.md is made).",
)
def config_reference_command(builtin: bool) -> None:
    """Print the configuration reference (Markdown) generated from the schema of the core and installed plugins.

    docs/configuration.md is the --builtin output; a test keeps the two identical.

    \b
    Example:
      kservice config reference > my-configuration.md
      kservice config reference --builtin > docs/configuration.md
    """
    click.echo(config_reference(builtin_only=builtin), nl=False)


def _yaml_inline(value: Any) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _setting_rows(schema: dict[str, Any], prefix: str) -> list[str]:
    from .._config import Setting

    lines = []
    for key, value in schema.items():
        if not isinstance(value, Setting):
            continue
        notes = []
        choices = value.choices
        if callable(choices):
            notes.append("one of the names installed plugins register")
        elif choices:
            notes.append("one of " + ", ".join(f"`{_yaml_inline(c)}`" for c in choices))
        if value.minimum is not None:
            notes.append(f"at least {value.minimum:g}")
        if value.maximum is not None:
            notes.append(f"at most {value.maximum:g}")
        doc = value.doc.rstrip(".") + (f" ({'; '.join(notes)})." if notes else ".")
        doc = doc.replace("|", r"\|")
        lines.append(f"| `{prefix}{key}` | {value.type_names()} | `{_yaml_inline(value.default)}` | {doc} |")
    return lines


def _sections(schema: dict[str, Any], prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
    """(dotted section path, section) for every section holding settings, depth first."""
    from .._config import Setting

    found: list[tuple[str, dict[str, Any]]] = []
    if any(isinstance(v, Setting) for v in schema.values()):
        found.append((prefix.rstrip("."), schema))
    for key, value in schema.items():
        if isinstance(value, dict):
            found.extend(_sections(value, f"{prefix}{key}."))
    return found


def _builtin_plugin(name: str) -> bool:
    """Whether plugin ``name`` ships inside the kservice distribution itself."""
    return get_plugin_manager().origins.get(name, "").startswith("entry point of kservice ")


def config_reference(builtin_only: bool = False) -> str:
    """The configuration reference in Markdown, from the schema of the core and the installed plugins.

    With ``builtin_only`` only the core's keys and those of the plugins shipped
    with kservice are included, so the text does not depend on what else is
    installed: ``docs/configuration.md`` is ``kservice config reference --builtin``.
    """
    import yaml

    from .._config import core_schema, defaults_of, merge_schema, service_entry_schema
    from .._plugins import _collect_registrations

    schema = core_schema()
    core_keys = {(section, key) for section, settings in _sections(schema) for key in settings}
    key_owner: dict[tuple[str, str], str] = {}
    for plugin_name, (path, addition) in _collect_registrations("kservice_config_schema"):
        if builtin_only and not _builtin_plugin(plugin_name):
            continue
        merge_schema(schema, path, addition)
        probe: dict[str, Any] = {}
        merge_schema(probe, path, addition)
        for section, settings in _sections(probe):
            for key in settings:
                key_owner.setdefault((section, key), plugin_name)

    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `kservice config reference --builtin` from the schema of the core and the",
        "     plugins shipped with kservice; do not edit by hand (tests/docs/test_configuration_reference.py",
        "     regenerates it and fails when it differs). -->",
        "",
        "kservice reads one YAML file: the `-c FILE` option of the command-line tool, the `config=`",
        "argument of `ServiceEnvironment` and `ServiceManager` (a path, a dict or a `Config`), or the",
        "file named by the `KSERVICE_CONFIG` environment variable. Every key is optional; a missing key",
        "takes the default below. An unknown key or a value of the wrong type is a `ConfigError` naming",
        "the full key path and the closest valid key. Check a file with `kservice config check FILE`",
        "and print the effective configuration with `kservice config show -c FILE`.",
        "",
        "## Where settings come from",
        "",
        "When the same thing is set in several places, the row higher in this table wins; a value that",
        "is wrong in any of them is an error, never silently replaced by one from a lower row.",
        "",
        "| source | what it sets | notes |",
        "|---|---|---|",
        "| arguments: `timeout=` of `call_service_sync` / `call_service_async` / `acall` / `proxy`, `kservice call --timeout` | that call's timeout | NaN and the infinities raise `ValueError` at once (a usage error, exit status 2, on the command line) |",
        "| arguments: `register_service(name, factory, kind=..., local={...})` | that service's options | merged over its `services.<name>` entry |",
        "| `services.<name>.<section>` in the configuration | one service's options | keys not given keep the global value |",
        "| the configuration: `config=` of `ServiceEnvironment` / `ServiceManager`, else `-c FILE`, else the file named by `KSERVICE_CONFIG` | everything on this page | exactly one file (or mapping) is read; they are not merged. A manager of an environment follows the environment's: `ServiceManager(env, config=...)` is a `TypeError` (the config was ignored), as is a config passed as the environment's name |",
        "| `KSERVICE_DISABLE_PLUGINS=a,b` | plugins not used | added to (never replaced by) `plugins.disable`; blocks the plugins before they are imported; a name close to an installed plugin's (a misspelling) is a `RuntimeWarning` at start and a problem in `kservice config check` |",
        "| `plugins.disable` in the file named by `KSERVICE_CONFIG` | plugins not used | read before plugins are imported, like the variable |",
        "| `plugins.disable` in a `-c FILE` or `config=` | plugins not used | applied when that configuration is loaded: the plugins are unregistered and blocked for the rest of the process (they were imported, so an import error still warns) |",
        "| `plugins.require` (any configuration) | plugins that must be loaded | one that is not installed, failed to load or is disabled is a `PluginError` when the configuration is loaded: nothing starts |",
        "| `KSERVICE_STRICT_PLUGINS=1` | every plugin is required | any plugin that fails to load is a `PluginError` |",
        "| `KSERVICE_CACHE_DIR=DIR` (or `off`) | where the entry-point cache lives | default `$XDG_CACHE_HOME/kservice`, "
        "else `~/.cache/kservice`; see below |",
        "| the defaults below | everything | |",
        "",
        "Plugins and services are found through entry points. What each `sys.path` directory declares is",
        "kept in a cache file (one per interpreter, owned by the user, written atomically) so that a new",
        "process does not import `importlib.metadata` and parse every installed distribution's metadata",
        "on each start (20-50 ms). A directory is read afresh whenever its modification time differs from",
        "the cached one (installing or removing a distribution changes it), a directory changed in the",
        "last two seconds is never cached (one whose time is ahead of the clock, because the clock stepped",
        'back since, is: a later change gives it another time; the working directory, `""` on `sys.path`,',
        "is cached under its own path, so commands run from different directories share the cache), and a",
        "cache file that is",
        "unreadable, of another format or not owned by the user is ignored and rewritten: the plugins",
        "found are always those",
        "`importlib.metadata.entry_points()` would find. `KSERVICE_CACHE_DIR=off` reads the metadata",
        "every time.",
        "",
        "`kservice plugins` lists loaded, disabled and failed plugins and why (`-c FILE` applies a file's",
        "`plugins` section). `kservice config check FILE` reports every problem in the file at once, one",
        "line each with its key path and the closest valid key: unknown keys and wrong types, unknown task",
        "kinds and transports, class paths whose module or class does not exist (found and read without",
        "running the module; `--import` imports it), service entry points that are not installed,",
        "required plugins that are not loaded, and `plugins.disable` names no installed plugin has (an",
        "error when the name is close to an installed plugin's, as `metrcs` to `metrics`: the plugin meant",
        "stays enabled; otherwise a note, since it may name a plugin installed where the file is also used).",
        "A name no installed plugin has owns no config keys, so it never lets an unknown key pass.",
        "",
        "A config file is read only if it is a regular file of at most 1 MiB of UTF-8 YAML, nested at",
        "most 64 levels deep, with no integer longer than 30 digits and no key given twice in one",
        "mapping; anything else is a one-line `ConfigError` (from `kservice config check`, `config show`,",
        "`serve -c`, `status -c`...), never a traceback or a wait. Floats must be finite (`.nan` and",
        "`.inf` are refused), and a float without an upper bound of its own is at most 9.2e9 (most are",
        "seconds, and no wait can be longer: `health.period: 1e12` is refused naming the key). Settings",
        "that allocate have upper bounds, given in their rows below.",
        "",
        "`kservice serve -c FILE` hosts each declared service as one instance in its own process. A",
        "service declared with another kind (`process`, `ray`) or `replicas` above 1 is refused with an",
        "error naming it, before anything starts; `kservice serve --host-locally` hosts one local instance",
        "of such a service instead and prints a note saying so.",
        "",
        "Plugins add their own sections and keys. This page lists those of the plugins shipped with",
        "kservice; `kservice config reference` prints the same page for whatever is installed. Every",
        "top-level section other than `service`, `services` and `plugins` (and `service.local`,",
        "`service.ray`) can be overridden per service under `services.<name>.<section>`; keys not",
        "overridden keep their global value.",
        "",
        "## Environment variables in a config file",
        "",
        "Any value in a config file (`-c FILE`, `config=` given a path, or the file named by",
        "`KSERVICE_CONFIG`) may refer to environment variables:",
        "",
        "| written | becomes |",
        "|---|---|",
        "| `${VAR}` | the value of `VAR` (empty if it is set to the empty string); an unset `VAR` is an error, below |",
        "| `${VAR:-default}` | the value of `VAR`, or `default` when `VAR` is unset or empty, as in the shell; the default may hold references itself (`${PORT:-${DEFAULT_PORT}}`), expanded only when it is used |",
        "| `$${` | a literal `${` (`$${HOME}` stays `${HOME}`); any other `$` is kept as written |",
        "",
        "- A plain (unquoted) value is typed after the substitution as if its text had been written in",
        "  the file (as nameko types numbers and booleans): `max_workers: ${WORKERS}` with `WORKERS=8` is the integer 8,",
        "  `enabled: ${LOG_CALLS}` with `LOG_CALLS=true` a boolean, and an empty result or `null` is null.",
        '  A quoted value (`"${PORT}"`) or one tagged `!!str` stays a string, so a quoted reference in',
        '  an int or float setting is refused exactly as `"8080"` would be. A variable\'s text is never',
        "  parsed as YAML structure (unlike nameko): `[a, b]` or `a: b` coming from a variable is a string.",
        "- Inside `{...}` or `[...]` YAML ends an unquoted value at `{`, so a reference there must be",
        '  quoted; tag it to type it: `local: {max_workers: !!int "${WORKERS}"}` (or `!!float`, `!!bool`),',
        "  or write the mapping in block style. A tagged value that does not read as its tag",
        '  (`!!int ""`) is a one-line error naming its line.',
        "- References are expanded in values at every depth (a service's `args` and `kwargs`, lists),",
        "  never in keys.",
        "- An unset variable with no default, or a malformed reference (`${` with no `}`, a name that is",
        "  not letters, digits and `_`, nameko's `${VAR:default}`, which suggests `${VAR:-default}`), is a",
        "  one-line `ConfigError` naming the key path, the variable and the file; its key keeps its",
        "  default, so nothing else is reported for it. `kservice config check` lists every such line;",
        "  every other command stops on the first (saying how many more there are) before anything starts:",
        "",
        "  ```text",
        "  error: service.local.max_workers: environment variable WORKERS is not set and has no default; set it, or write '${WORKERS:-default}' (config file services.yaml)",
        "  ```",
        "",
        "- A mapping or `Config` given in Python (`ServiceEnvironment(config={...})`) is used as written,",
        "  not interpolated: Python code reads `os.environ` itself, and the effective configuration handed",
        "  to child hosts (already expanded) must not be expanded a second time.",
        "- Variables are read when the file is loaded, from that process's environment; a",
        "  `kservice serve --reload` restart reads the file again.",
        "",
        "## Choices are accepted in any case",
        "",
        'A setting whose row below says "one of ..." accepts each value in any case and keeps the',
        "spelling shown: `call_log.level: info` is `INFO`, `service.ray.lifetime: Detached` is `detached`,",
        "in the file, in a mapping given in Python and in `register_service(...)` options alike. A value",
        "that is none of them in any case is an error suggesting the closest one",
        "(`call_log.level: 'inf' is not one of 'DEBUG', 'INFO', 'WARNING', 'ERROR'; did you mean 'INFO'?`).",
        "`kservice serve --log-level` also takes any case.",
        "",
    ]
    for section, settings in _sections(schema):
        plugins: dict[str, list[str]] = {}
        for key in settings:
            if (section, key) not in core_keys and (section, key) in key_owner:
                plugins.setdefault(key_owner[(section, key)], []).append(key)
        if any((section, key) in core_keys for key in settings):
            origin = "Declared by the core"
            origin += "".join(
                f"; plugin `{name}` adds {', '.join(f'`{k}`' for k in keys)}" for name, keys in sorted(plugins.items())
            )
        else:
            origin = "Declared by " + " and ".join(f"plugin `{name}`" for name in sorted(plugins))
        out += [f"## `{section}`", "", origin + ".", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        out += _setting_rows(settings, f"{section}.")
        out.append("")
    out += [
        "## `services.<name>`",
        "",
        "One entry per service the environment registers at construction. An entry may be just an",
        "import path (`kv: myapp.kv:KV`). Besides the keys below, an entry may hold any overridable",
        "section (`local`, `ray`, `service_call`, plugin sections) with the keys to change for this",
        "service only.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
        *_setting_rows(service_entry_schema(), ""),
        "",
        "## Every default",
        "",
        "`kservice config show` with no file prints this (plus a comment line naming the source):",
        "",
        "```yaml",
        yaml.safe_dump(defaults_of(schema) | {"services": {}}, sort_keys=False, default_flow_style=False).rstrip(),
        "```",
        "",
        "## Example",
        "",
        "```yaml",
        "service_call:",
        "  default_timeout: ${CALL_TIMEOUT:-10}  # from the environment, 10 when CALL_TIMEOUT is unset",
        "services:",
        "  kv:",
        "    class: myapp.kv:KV",
        "    kind: process        # host it in a child process, reachable over shared memory",
        "    service_call:",
        "      default_timeout: 2 # calls to kv time out sooner than the others",
        "  text:",
        "    class: myapp.text:Text",
        "    kind: local",
        "    local:",
        "      max_workers: 4",
        "```",
        "",
    ]
    return "\n".join(out)
