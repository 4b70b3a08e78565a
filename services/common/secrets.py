"""The one rule for the secrets a process starts with (bearer tokens, the S3 secret key), and for the
address it binds.

- A placeholder is always refused: a value containing REPLACE-ME or CHANGE-ME (any case, with or
  without the dash), as in deploy/k8s/base/secret.yaml's template. Running with it would mean running
  with a secret anyone can read in this repository.
- A bearer token shorter than MIN_TOKEN_CHARS is refused when the process binds a non-loopback address
  (reachable from elsewhere, so guessable matters); on loopback a short one is allowed for local tries.
- Binding a non-loopback address without any token is allowed (a NetworkPolicy may be the protection
  chosen, as in deploy/k8s/base/networkpolicy.yaml) but logged as a warning.

serve, gateway and worker call check_startup() before connecting to anything and exit with code 2 on
WeakSecret.
"""

from __future__ import annotations

import ipaddress
import logging
import re

log = logging.getLogger("bagel.secrets")

MIN_TOKEN_CHARS = 16
_PLACEHOLDER = re.compile(r"replace[-_ ]?me|change[-_ ]?me", re.IGNORECASE)


class WeakSecret(ValueError):
    """A secret the process refuses to start with; the message names it and says why."""


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the port on this machine ("localhost", 127.0.0.0/8, ::1)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume reachable from elsewhere


def is_placeholder(value: str) -> bool:
    return bool(_PLACEHOLDER.search(value))


def check_secret(value: str | None, what: str) -> None:
    """WeakSecret when `value` is a placeholder; None or empty passes (absence is the caller's to judge)."""
    if value and is_placeholder(value):
        raise WeakSecret(f"{what} is a placeholder (it contains REPLACE-ME or CHANGE-ME): set a real secret "
                         "before starting")


def check_token(token: str | None, what: str, host: str | None = None) -> None:
    """WeakSecret for a placeholder token, or a short one when serving on non-loopback `host`."""
    check_secret(token, what)
    if token and host is not None and not is_loopback(host) and len(token) < MIN_TOKEN_CHARS:
        raise WeakSecret(f"{what} has {len(token)} characters; binding {host} needs at least {MIN_TOKEN_CHARS} "
                         "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")


def check_startup(process: str, *, token: str | None, token_name: str, s3_secret: str | None,
                  host: str | None = None) -> None:
    """The start-up check of `process` (serve, gateway, worker): WeakSecret for a refused secret; a
    warning when it binds a non-loopback `host` with no token at all. `host` None: it serves nothing."""
    check_token(token, token_name, host)
    check_secret(s3_secret, "BAGEL_S3_SECRET_KEY")
    if host is not None and not token and not is_loopback(host):
        log.warning(f"{process} binds {host} WITHOUT authentication: anyone who can reach it may call it. Set "
                    f"{token_name}, or make sure a network policy or firewall is the protection",
                    extra={"host": host})
