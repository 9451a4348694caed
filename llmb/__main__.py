"""Command line: `python -m llmb <command> ...`.

Each command lives beside the code it drives and registers itself here:
story model commands in `llmb.story.cli`, assistant commands in `llmb.assistant.cli`.
The trainers are commands too (`llmb train-story`, `llmb train-assistant`), so an installed llmb
trains without the repository; `training/*.py` are the same commands as scripts.
"""

import sys

from llmb.errors import UserError
from llmb.settings import Parser


def build_parser():
    from llmb.assistant import cli as cli_assistant
    from llmb.story import cli as cli_story

    parser = Parser(prog="python -m llmb", description="LLM basics: story model and assistant.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cli_story.register(sub)
    cli_assistant.register(sub)
    return parser


def main(argv=None):
    if (argv if argv is not None else sys.argv[1:])[:1] in (["train-story"], ["train-assistant"]):
        from llmb.runlog import listen_for_stop

        listen_for_stop()  # first thing in a trainer: a Stop while it starts is kept, even under nohup
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
