"""The process gleaner runs llama.cpp in: the proven CPU variant first, then the work.

    python -m gleaner.llm.llama_server serve -- <llama_cpp.server arguments>
    python -m gleaner.llm.llama_server quantize SOURCE.gguf TARGET.gguf

Both load the CPU variant :mod:`gleaner.llm.llama_build` chose for this machine
(``GLEANER_LLAMA_CPU_VARIANT`` names it; unset means the build's own CPU code),
then run llama-cpp-python's OpenAI-compatible server, or requantise a GGUF to
Q4_0. Everything that executes llama.cpp code runs here, in a child process, so
an illegal instruction kills this process and is reported by its parent, never
the flow.
"""

from __future__ import annotations

import argparse
import os
import sys

VARIANT_ENV = "GLEANER_LLAMA_CPU_VARIANT"


def _load_variant() -> None:
    path = os.environ.get(VARIANT_ENV)
    if path:
        from gleaner.llm.llama_build import load_variant

        load_variant(path)


def quantize_q4_0(source: str, target: str) -> int:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    params.nthread = max(1, os.cpu_count() or 1)
    return int(llama_cpp.llama_model_quantize(source.encode(), target.encode(), params))


def serve(arguments: list[str]) -> None:
    from llama_cpp.server.__main__ import main as server_main

    sys.argv = ["llama_cpp.server", *arguments]
    server_main()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    q = commands.add_parser("quantize", help="requantise a GGUF file to Q4_0")
    q.add_argument("source")
    q.add_argument("target")
    s = commands.add_parser("serve", help="llama-cpp-python's server; arguments after --")
    s.add_argument("arguments", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    _load_variant()
    if args.command == "quantize":
        return quantize_q4_0(args.source, args.target)
    arguments = args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments
    serve(arguments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
