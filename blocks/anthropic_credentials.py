"""Save the Anthropic API key as an AnthropicCredentials block on the Prefect server the loops use.

    ANTHROPIC_API_KEY=sk-ant-… python blocks/anthropic_credentials.py [--name anthropic]

The key is read from ANTHROPIC_API_KEY (or typed in, hidden, when it is unset); the loop config then names the
block as ``proposer: {kind: claude, credentials: NAME}`` (the name ``anthropic`` is looked up by default).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from cq_prefect.credentials import DEFAULT_BLOCK, AnthropicCredentials


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=DEFAULT_BLOCK, help=f"block name (default: {DEFAULT_BLOCK})")
    args = parser.parse_args()
    key = os.environ.get("ANTHROPIC_API_KEY", "").strip()
    if not key and sys.stdin.isatty():
        key = getpass.getpass("Anthropic API key: ").strip()
    if not key:
        print("no key: export ANTHROPIC_API_KEY=sk-ant-… and run this again", file=sys.stderr)
        return 2
    AnthropicCredentials(api_key=key).save(args.name, overwrite=True)
    print(f"saved AnthropicCredentials block {args.name!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
