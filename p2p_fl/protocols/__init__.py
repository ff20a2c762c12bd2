"""Protocols: state machines driven by messages, finished training and the time."""

from p2p_fl.protocols.actions import Action, Finish, Refuse, Send, Train, Weights
from p2p_fl.protocols.ensemble import EnsembleProtocol
from p2p_fl.protocols.gossip import GossipProtocol
from p2p_fl.protocols.local import LocalProtocol
from p2p_fl.protocols.ring import RingProtocol, ring_schedule

__all__ = ["Action", "EnsembleProtocol", "Finish", "GossipProtocol", "LocalProtocol", "Refuse", "RingProtocol", "Send", "Train", "Weights", "ring_schedule"]
