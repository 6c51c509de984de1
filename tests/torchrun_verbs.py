"""Run several ceprompt commands one after another in the same processes (launched by torchrun): each joins the
process group and leaves it, as a user's script that calls several verbs does. Arguments: a JSON list of argument
lists; each command's log is preceded by a line ``@@ceprompt-verb <verb>`` on stderr."""

import json
import sys

from ceprompt.cli import main

for argv in json.loads(sys.argv[1]):
    print(f"\n@@ceprompt-verb {argv[0]}", file=sys.stderr, flush=True)
    code = main(argv)
    if code:
        sys.exit(code)
