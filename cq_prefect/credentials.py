"""The Anthropic API key as a Prefect block, and where the Claude proposer finds its key.

    >>> AnthropicCredentials(api_key="sk-ant-example").api_key        # the key never prints
    SecretStr('**********')

Save it once on the Prefect server the loops use (``python blocks/anthropic_credentials.py``, which reads
``ANTHROPIC_API_KEY``), or give every host that runs loops ``ANTHROPIC_API_KEY``. :func:`anthropic_key`
looks in that order: the block the config names, ``ANTHROPIC_API_KEY``, then a block named
:data:`DEFAULT_BLOCK`. The key stays a :class:`~pydantic.SecretStr` until the SDK client is built, so it
never reaches a log line, a flow parameter, an artifact or MLflow.
"""

from __future__ import annotations

import os

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from cq_prefect.errors import BadInput

DEFAULT_BLOCK = "anthropic"
"""The block name looked up when the config names none and ``ANTHROPIC_API_KEY`` is unset."""


class AnthropicCredentials(Block):
    """An Anthropic API key, for the Claude proposer of research loops and `cq pi`."""

    _block_type_name = "Anthropic Credentials"
    _block_type_slug = "anthropic-credentials"
    _logo_url = "https://www.anthropic.com/favicon.ico"
    _description = "An Anthropic API key for cq-prefect's Claude proposer (research loops, `cq pi`)."

    api_key: SecretStr = Field(
        title="API key", description="An Anthropic API key (console.anthropic.com → API keys), e.g. sk-ant-…")


def anthropic_key(block: str | None = None) -> SecretStr:
    """The API key: from the block named ``block``; else ``ANTHROPIC_API_KEY``; else the block ``anthropic``.

    Raises BadInput naming both ways to provide a key when there is none.
    """
    if block:
        return _load(block, required=True).api_key  # type: ignore[union-attr]
    key = os.environ.get("ANTHROPIC_API_KEY", "").strip()
    if key:
        return SecretStr(key)
    saved = _load(DEFAULT_BLOCK, required=False)
    if saved is not None:
        return saved.api_key
    raise BadInput(
        "the Claude proposer needs an Anthropic API key and found none: export ANTHROPIC_API_KEY=sk-ant-… where the "
        "loop runs, or save it in a Prefect block (ANTHROPIC_API_KEY=sk-ant-… python blocks/anthropic_credentials.py "
        f"--name {DEFAULT_BLOCK}) and give its name as proposer.credentials"
    )


def _load(name: str, *, required: bool) -> AnthropicCredentials | None:
    try:
        return AnthropicCredentials.load(name, validate=True)  # type: ignore[return-value]
    except ValueError as exc:  # Prefect: "Unable to find block document named …"
        if not required:
            return None
        raise BadInput(
            f"proposer.credentials: no AnthropicCredentials block named {name!r} on this Prefect server ({exc}); "
            f"save one (ANTHROPIC_API_KEY=sk-ant-… python blocks/anthropic_credentials.py --name {name}) or drop "
            f"proposer.credentials and export ANTHROPIC_API_KEY"
        ) from exc
    except Exception as exc:  # the server is away, or no server at all: only an explicit block is an error
        if not required:
            return None
        raise BadInput(f"proposer.credentials: could not read block {name!r} from the Prefect server: {exc}") from exc
