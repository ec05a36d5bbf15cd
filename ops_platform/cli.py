"""`ops-platform <command>`: the commands an operator or CI runs outside Dagster."""

from __future__ import annotations

import sys

COMMANDS = {
    "compliance": "run the compliance controls over manifests and Helm charts offline "
    "(exit 1 on ERROR findings, 2 on input that could not be judged, 3 on an internal error)",
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        usage = "usage: ops-platform <command> [options]\n\ncommands:\n" + "".join(
            f"  {name:12s} {help_text}\n" for name, help_text in COMMANDS.items()
        )
        print(usage, file=sys.stderr if args and args[0] not in ("-h", "--help") else sys.stdout)
        return 0 if args and args[0] in ("-h", "--help") else 2
    if args[0] == "compliance":
        from ops_platform.compliance.cli import main as compliance_main

        return compliance_main(args[1:])
    raise AssertionError("unreachable")


if __name__ == "__main__":
    sys.exit(main())
