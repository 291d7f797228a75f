"""Image signatures: keys held in Vault's transit engine, DSSE envelopes beside the images,
verification before every start. Knows nothing of gRPC or Nomad."""

from __future__ import annotations

import os


def mode_for(image: str, default: str, rules: tuple[str, ...]) -> str:
    """The mode for an image: the longest matching "PREFIX=MODE" rule. image is the normalised
    reference or the opened file's real path; a path prefix matches whole components of the
    normalised path only, so "/img/dev/../prod/x" or "/img/dev2/x" never match "/img/dev/"."""
    best, mode = -1, default
    if image.startswith("/"):
        image = os.path.normpath(image)
    for rule in rules:
        prefix, _, value = rule.rpartition("=")
        if prefix.startswith("/"):
            top = os.path.normpath(prefix).rstrip("/")
            matches = image == top or image.startswith(top + "/")
        else:
            # A registry repository is the same repository whichever transport reaches it:
            # a rule for docker://reg/prod/ covers oras://reg/prod/ too (else it fails open).
            matches = _registry_path(image).startswith(_registry_path(prefix))
        if matches and len(prefix) > best:
            best, mode = len(prefix), value
    return mode


def _registry_path(text: str) -> str:
    """A registry reference (or rule prefix) with one transport and a lower-case host."""
    for transport in ("docker://", "oras://"):
        if text.startswith(transport):
            host, sep, rest = text[len(transport) :].partition("/")
            return f"registry://{host.lower()}{sep}{rest}"
    return text
