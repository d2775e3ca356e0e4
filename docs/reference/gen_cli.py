"""Writes ``reference/cli.md`` while mkdocs builds the site (mkdocs-gen-files): every command of
``kdcache`` with its help text and options, read from the commands themselves (the same click
objects ``kdcache COMMAND --help`` prints), so the page cannot drift from what runs."""

from __future__ import annotations

import click
import mkdocs_gen_files
import typer

from kdcache.cli.app import app


def cell(text: str) -> str:
    # rich markup's escapes (typer's help is rich text) as the terminal shows them
    return " ".join(str(text).split()).replace("\\[", "[").replace("|", "\\|")


def option_row(param: click.Parameter, ctx: click.Context) -> str:
    names = ", ".join(f"`{n}`" for n in [*param.opts, *param.secondary_opts])
    if isinstance(param, click.Argument):
        names = f"`{param.human_readable_name}`" + (" (one or more)" if param.nargs == -1 else "")
    default = ""
    if not getattr(param, "is_flag", False) or param.default:
        value = param.get_default(ctx, call=False)
        if value not in (None, (), []) and not callable(value) and getattr(param, "show_default", True) is not False:
            default = f"`{value if not isinstance(value, (list, tuple)) else ','.join(map(str, value))}`"
    required = "yes" if param.required else ""
    return f"| {names} | {cell(getattr(param, 'help', '') or '')} | {default} | {required} |"


def page() -> str:
    group = typer.main.get_command(app)
    ctx = click.Context(group, info_name="kdcache")
    lines = ["# Command-line reference", "",
             "Generated from the commands' own help when the site is built (`docs/reference/gen_cli.py`): "
             "`kdcache COMMAND --help` prints the same. `--config FILE` (where a command has it) takes any "
             "of its options from a YAML or JSON file; the command line wins over the file.", ""]
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        sub = click.Context(command, info_name=name, parent=ctx)
        lines += [f"## `kdcache {name}`", "", (command.help or "").strip(), "",
                  "```", command.get_usage(sub).strip(), "```", "",
                  "| option | what | default | required |", "| --- | --- | --- | --- |"]
        lines += [option_row(p, sub) for p in command.params if not getattr(p, "hidden", False)]
        lines.append("")
    return "\n".join(lines)


with mkdocs_gen_files.open("reference/cli.md", "w") as f:
    f.write(page())
