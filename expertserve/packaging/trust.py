"""Which package signers are trusted. Pure Python.

Trusted keys come from the command line, the server config (`trusted_keys`) and `EXPERTSERVE_TRUSTED_KEYS`
(comma-separated; each a 64-hex Ed25519 public key or a `.pub` file): all of them count. A package not signed by
one of them is refused by `install`, and an installed expert from one is not served, unless untrusted packages are
explicitly allowed (`--allow-untrusted`, `allow_untrusted: true`, `EXPERTSERVE_ALLOW_UNTRUSTED=1`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from expertserve.errors import SignatureError
from expertserve.packaging.signing import read_public_key

TRUSTED_KEYS_ENV = "EXPERTSERVE_TRUSTED_KEYS"
ALLOW_UNTRUSTED_ENV = "EXPERTSERVE_ALLOW_UNTRUSTED"
HOW_TO_TRUST = (
    f"trust its signer with --trusted-key, the server's trusted_keys or {TRUSTED_KEYS_ENV}, "
    f"or allow untrusted packages explicitly (--allow-untrusted, allow_untrusted, {ALLOW_UNTRUSTED_ENV}=1)"
)


@dataclass(frozen=True)
class TrustPolicy:
    """Trusted signer keys (lower-case hex) and whether packages signed by nobody trusted are allowed anyway."""

    trusted_keys: frozenset[str] = frozenset()
    allow_untrusted: bool = False

    @classmethod
    def build(
        cls,
        keys: Iterable[str] = (),
        *,
        allow_untrusted: bool = False,
        environ: Mapping[str, str] | None = None,
    ) -> TrustPolicy:
        """The policy from explicit keys plus the environment's.

        Raises:
            SignatureError: A key that is neither 64 hex characters nor a readable `.pub` file (named).
        """
        env = os.environ if environ is None else environ
        given = [*keys, *(k for k in env.get(TRUSTED_KEYS_ENV, "").split(",") if k.strip())]
        allow = allow_untrusted or env.get(ALLOW_UNTRUSTED_ENV, "").strip().lower() in ("1", "true", "yes")
        return cls(frozenset(read_public_key(k.strip()) for k in given), allow)

    def refusal(self, signer: str | None) -> str | None:
        """Why a package by `signer` (None: unsigned) is refused, or None when it is accepted."""
        if signer is not None and signer.lower() in self.trusted_keys:
            return None
        if self.allow_untrusted:
            return None
        who = "unsigned" if signer is None else f"signed by {signer}, which is not a trusted key"
        return f"{who}; {HOW_TO_TRUST}"

    def check(self, signer: str | None, what: str) -> None:
        """Raises SignatureError naming `what` when `refusal` has a reason."""
        reason = self.refusal(signer)
        if reason:
            raise SignatureError(f"{what}: {reason}")

    def trusts(self, signer: str | None) -> bool:
        """Whether `signer` is one of the trusted keys (allowing untrusted packages does not make them trusted)."""
        return signer is not None and signer.lower() in self.trusted_keys
