"""Run one atheris target: ``python3 -m fuzz.one TARGET [libFuzzer flags] [corpus dirs]``.

Used by ``fuzz.run``; atheris.Fuzz() never returns (libFuzzer exits the process).
"""

from __future__ import annotations

import sys

import atheris


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python3 -m fuzz.one TARGET [libFuzzer flags] [corpus]")
    name = sys.argv.pop(1)
    with atheris.instrument_imports(include=["invictusd"]):
        from fuzz import targets
    fn = targets.TARGETS[name]
    atheris.Setup(sys.argv, fn)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
