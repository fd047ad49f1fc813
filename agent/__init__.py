"""studio-agent: the per-host node agent of Studios.

It dials the controller over one gRPC stream, reconciles the sessions placed on
this host toward the desired state it is sent, and owns everything that touches
the host: runtime backends, session volumes, checkpoints, the connect proxy and
a local admin socket for its CLI.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
