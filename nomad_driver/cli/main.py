"""The `pyhpc` command: run containers, install the plugin, check jobspecs, show the options."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from nomad_driver import __version__
from nomad_driver.cli import add_var_flags, pairs

PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))


def install_plugin(plugin_dir: str, name: str, gpu: bool = False) -> int:
    """Write an executable launcher that Nomad runs from its plugin_dir: the task driver, or
    with gpu the NVIDIA device plugin."""
    directory = plugin_dir
    if not os.path.isdir(directory):
        print(f"pyhpc: --plugin-dir {plugin_dir}: no such directory", file=sys.stderr)
        return 2
    launcher = (
        f"#!{sys.executable}\n"
        "# Installed by `pyhpc install-plugin`: Nomad runs this file as the pyhpc task driver.\n"
        "import sys\n"
        f"sys.path.insert(0, {PACKAGE_PARENT!r})\n"
        f"from nomad_driver.{'device' if gpu else 'driver'}.main import main\n"
        "sys.exit(main())\n"
    )
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".pyhpc-")
    with os.fdopen(fd, "w") as f:
        f.write(launcher)
    os.chmod(tmp, 0o755)
    os.replace(tmp, os.path.join(directory, name))
    print(f"installed {os.path.join(directory, name)}")
    print(f'add to the agent configuration:  plugin "{name}" {{ config {{ }} }}')
    return 0


def validate(paths: list[str], var: list[str], var_files: list[str], strict: bool = False) -> int:
    """Check every pyhpc task of each jobspec, with Nomad's parser when `nomad` is on PATH;
    strict: an image named by a tag (which may move) is a problem too."""
    from nomad_driver.cli import job_variables
    from nomad_driver.driver import jobspec, nomad_parser

    try:
        values = job_variables(var, var_files)
        named_by = {
            name: f"-var-file {path}: {name}"
            for path in var_files
            for name in job_variables([], [path], {})
        }
        named_by.update({name: f"-var {name}" for name in pairs(var, "-var", "NAME=VALUE")})
    except ValueError as err:
        print(f"pyhpc jobspec validate: {err}", file=sys.stderr)
        return 2
    arguments = [a for path in var_files for a in ("-var-file", path)]
    arguments += [a for item in var for a in ("-var", item)]
    variables = jobspec.Variables(values, named_by, tuple(arguments), os.environ)
    nomad = nomad_parser.find(os.environ)
    failed = False
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                report = jobspec.check(f.read(), variables, nomad)
        except (OSError, ValueError) as err:
            print(f"{path}: {getattr(err, 'strerror', None) or err}", file=sys.stderr)
            failed = True
            continue
        for p in report.problems:
            where = ":".join(str(n) for n in (p.file or path, p.line, p.column) if n)
            print(f"{where}: {p.message}", file=sys.stderr)
            failed = True
        if not report.tasks and not report.problems:
            print(f'{path}: no task uses driver "pyhpc"')
        for r in report.tasks:
            task = f"job {r.job!r} group {r.group!r} task {r.task!r}"
            for problem in [*r.problems, *(r.warnings if strict else ())]:
                print(f"{path}:{problem.line}: {task}: {problem.message}", file=sys.stderr)
                failed = True
            if not r.problems and not (strict and r.warnings):
                print(f"{path}:{r.line}: {task}: ok")
    return 1 if failed else 0


def config_reference() -> int:
    from nomad_driver.device.service import DeviceConfig
    from nomad_driver.driver import config
    from nomad_driver.wire import schema

    print('### Plugin options (`plugin "pyhpc" { config { ... } }`)\n')
    print(schema.markdown_table(config.PluginConfig))
    print('\n### Task options (`config { ... }` of a task with `driver = "pyhpc"`)\n')
    print(schema.markdown_table(config.TaskConfig))
    print('\n### GPU device plugin options (`plugin "pyhpc-gpu" { config { ... } }`)\n')
    print(schema.markdown_table(DeviceConfig))
    return 0


def vault_setup(args: argparse.Namespace) -> int:
    from nomad_driver.signing.vault import Vault, VaultError

    try:
        policies = Vault(transit=args.transit).setup(args.key, args.algorithm)
    except VaultError as err:
        print(f"pyhpc vault setup: {err}", file=sys.stderr)
        return 1
    print(f"transit key {args.transit}/{args.key} ({args.algorithm}, not exportable) is ready")
    for name, text in policies.items():
        print(f"\npolicy {name}:\n{text}")
    return 0


def parser(only: str = "") -> argparse.ArgumentParser:
    """The command line; only: build just that command's parser (`pyhpc run` starts a
    container: the other commands' parsers and modules would cost it 20 ms)."""
    from nomad_driver.cli import run

    p = argparse.ArgumentParser(
        prog="pyhpc",
        description="pyhpc: a Nomad task driver for HPC jobs in SquashFS containers.",
    )
    p.add_argument("--version", action="version", version=f"pyhpc {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if only == "run":
        run.add_parser(sub)
        return p
    from nomad_driver.cli import dispatch, image, provenance, sync

    inst = sub.add_parser(
        "install-plugin", help="install the driver (or the GPU device plugin) into a plugin_dir"
    )
    inst.add_argument("--plugin-dir", required=True, help="the agent's plugin_dir")
    inst.add_argument(
        "--gpu",
        action="store_true",
        help="install the NVIDIA device plugin (default name pyhpc-gpu)",
    )
    inst.add_argument(
        "--name",
        help="file name; must match the plugin block label "
        "(default pyhpc, or pyhpc-gpu with --gpu)",
    )
    job = sub.add_parser("jobspec", help="work with jobspecs")
    job_sub = job.add_subparsers(dest="jobspec_command", required=True, metavar="ACTION")
    val = job_sub.add_parser(
        "validate",
        help="check the config of every pyhpc task",
        description="Parse each FILE with Nomad's own parser when `nomad` is on PATH (`nomad job "
        "run -output`, which needs no agent), else with python-hcl2, and check the config of "
        "every pyhpc task: each problem once, with its line. Exit 1 if any.",
    )
    val.add_argument("files", nargs="+", metavar="FILE")
    val.add_argument(
        "--strict",
        action="store_true",
        help="also fail on registry images and datasets named by tag instead of digest "
        "(a re-run may get other bytes)",
    )
    add_var_flags(val)
    sub.add_parser(
        "config-reference",
        help="print the option tables: the pyhpc plugin, its tasks, the pyhpc-gpu plugin",
    )
    run.add_parser(sub)
    image.add_parser(sub)
    dispatch.add_parser(sub)
    sync.add_parser(sub)
    provenance.add_parser(sub)
    vault = sub.add_parser("vault", help="set up Vault for image signing")
    vault_sub = vault.add_subparsers(dest="vault_command", required=True, metavar="ACTION")
    setup = vault_sub.add_parser(
        "setup",
        help="create the transit key (non-exportable) and the signer and verifier policies",
        description="Uses VAULT_ADDR and VAULT_TOKEN (a token allowed to mount engines, create "
        "keys and write policies).",
    )
    setup.add_argument("--key", required=True, help="transit key name, e.g. pyhpc-images")
    setup.add_argument("--algorithm", choices=("ed25519", "ecdsa-p256"), default="ed25519")
    setup.add_argument("--transit", default="transit", help="transit mount (default transit)")
    return p


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["run"]:
        from nomad_driver.cli import signals

        try:
            signals.stop_on_signals()
            from nomad_driver.cli import run

            code = run.run(parser("run").parse_args(argv))
        except signals.Interrupted as stop:
            signals.ignore()
            name = signal.Signals(stop.signum).name
            print(f"pyhpc run: stopped by {name}", file=sys.stderr)
            code = 128 + stop.signum
        finally:
            try:
                signals.ignore()  # the run is over: a late signal does not change how it ended
            except signals.Interrupted:  # one pending as the mask changed (Python ran it)
                signals.ignore()
        return code
    args = parser("").parse_args(argv)
    if args.command == "install-plugin":
        name = args.name or ("pyhpc-gpu" if args.gpu else "pyhpc")
        return install_plugin(args.plugin_dir, name, args.gpu)
    if args.command == "jobspec":
        return validate(args.files, args.var, args.var_file, args.strict)
    if args.command == "image":
        from nomad_driver.cli import image

        return image.run(args)
    if args.command == "dispatch":
        from nomad_driver.cli import dispatch

        return dispatch.run(args)
    if args.command == "job":
        from nomad_driver.cli import sync

        return sync.run(args)
    if args.command == "vault":
        return vault_setup(args)
    if args.command == "provenance":
        from nomad_driver.cli import provenance

        return provenance.run(args)
    return config_reference()


if __name__ == "__main__":
    sys.exit(main())
