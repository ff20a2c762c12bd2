"""Networking: the wire format and a node's ZeroMQ peer."""

from p2p_fl.net.peer import Peer
from p2p_fl.net.wire import Message, WireError, decode, encode, spec_of

__all__ = ["Message", "Peer", "WireError", "decode", "encode", "spec_of"]
