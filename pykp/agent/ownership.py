"""Who holds a frontend two services claim: the older service (kube-proxy's rule), for
both sources alike.

A claim is a service address with a port and protocol, or a nodePort with its protocol
(held on every node address). Each claim goes to its oldest claimant (creationTimestamp,
then namespace/name); a service that loses a claim loses that frontend only, and keeps the
rest, as a service IP equal to a node address does. Updating one service touches only its
own claims, and names the other services whose holdings that changed.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from pykp.model import ServiceSpec

__all__ = ["NODE_PORT", "Claim", "FrontendOwners", "claim_text", "claims_of"]

# The address of a nodePort claim: it is held on every node address at once.
NODE_PORT = "nodePort"

Claim = tuple[str, int, str]  # (address or NODE_PORT, port, protocol)
# What a service claims, as held: (its creationTimestamp, *its claims sorted), one tuple
# per service (a rank and a claims tuple beside it cost 112 bytes more each).
_Entry = tuple[object, ...]


def claims_of(spec: ServiceSpec, node_addresses: Collection[str] = ()) -> tuple[Claim, ...]:
    """Every frontend `spec` asks for, sorted. An address of the node is claimed as a
    nodePort is: both are the node's port, whoever asks for it."""
    addresses = (*spec.cluster_ips, *spec.external_ips, *spec.load_balancer_ips)
    claims = {
        (NODE_PORT if address in node_addresses else address, port.port, port.protocol)
        for port in spec.ports
        for address in addresses
    }
    claims.update(
        (NODE_PORT, port.node_port, port.protocol)
        for port in spec.ports
        if port.node_port is not None
    )
    return tuple(sorted(claims))


def claim_text(claim: Claim) -> str:
    address, port, protocol = claim
    if address == NODE_PORT:
        return f"nodePort {port}/{protocol}"
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{port}/{protocol}"


class FrontendOwners:
    """The claimants of every claim, and so its holder.

    Held per service (100,000 of them in a large cluster), so compactly: a claim's
    claimant is its key alone, a tuple of keys only for the few contested claims, and each
    service's claims one tuple with its creation time (a dict or frozenset of one item
    costs 200+ bytes). Of two claimants the older holds: (created, key) the smaller.
    """

    def __init__(self) -> None:
        self._claimants: dict[Claim, str | tuple[str, ...]] = {}
        self._claims: dict[str, _Entry] = {}

    def update(
        self, key: str, spec: ServiceSpec | None, node_addresses: Collection[str] = ()
    ) -> set[str]:
        """Record what `key` claims now (None: it is gone); return the other services
        whose holdings changed."""
        before = self._claims.get(key)
        entry = None if spec is None else (spec.created, *claims_of(spec, node_addresses))
        if before is not None and before == entry:
            return set()
        claims = _claims(entry)
        touched = set(claims)
        touched.update(_claims(before))
        # Who held each claim before (with `key` at its old rank, if it had one).
        holders = {claim: self.holder(claim) for claim in touched}
        if before is not None:
            for claim in _claims(before):
                self._drop(claim, key)
            del self._claims[key]
        if entry is not None:
            self._claims[key] = entry
            for claim in claims:
                self._add(claim, key)
        affected: set[str] = set()
        for claim, holder in holders.items():
            now = self.holder(claim)
            if now != holder:
                affected.update(k for k in (holder, now) if k is not None)
        affected.discard(key)
        return affected

    def holder(self, claim: Claim) -> str | None:
        claimants = self._claimants.get(claim)
        if claimants is None or isinstance(claimants, str):
            return claimants
        return min(claimants, key=lambda key: (self._claims[key][0], key))

    def lost(self, key: str) -> dict[Claim, str]:
        """The claims of `key` another service holds, with that service."""
        lost: dict[Claim, str] = {}
        for claim in _claims(self._claims.get(key)):
            holder = self.holder(claim)
            if holder is not None and holder != key:
                lost[claim] = holder
        return lost

    def keys(self) -> Iterable[str]:
        return self._claims.keys()

    def _add(self, claim: Claim, key: str) -> None:
        claimants = self._claimants.get(claim)
        if claimants is None:
            self._claimants[claim] = key
        elif isinstance(claimants, str):
            self._claimants[claim] = (claimants, key)
        else:
            self._claimants[claim] = (*claimants, key)

    def _drop(self, claim: Claim, key: str) -> None:
        claimants = self._claimants[claim]
        if isinstance(claimants, str):
            del self._claimants[claim]
            return
        rest = tuple(k for k in claimants if k != key)
        self._claimants[claim] = rest[0] if len(rest) == 1 else rest


def _claims(entry: _Entry | None) -> tuple[Claim, ...]:
    return entry[1:] if entry is not None else ()  # type: ignore[return-value]
