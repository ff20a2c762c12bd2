"""Networking: the wire format and a node's ZeroMQ peer."""

from p2p_fl.net.keys import KeyFileError, generate_keypair, is_public_key, load_public_key, load_secret_key
from p2p_fl.net.peer import Curve, Peer
from p2p_fl.net.wire import Message, WireError, decode, encode, spec_of

__all__ = [
    "Curve", "KeyFileError", "Message", "Peer", "WireError", "decode", "encode", "generate_keypair",
    "is_public_key", "load_public_key", "load_secret_key", "spec_of",
]
