"""p2p_fl: serverless peer-to-peer federated learning for medical imaging."""

__version__ = "0.1.0"
