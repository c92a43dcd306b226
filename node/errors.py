"""The node's exceptions: one base class, so callers can catch everything the node raises on purpose."""


class NodeError(Exception):
    """Base of every error the node raises deliberately."""


class ConfigError(NodeError):
    """A configuration file or override is invalid; the message names the key, value and expectation."""


class PhantomError(NodeError):
    """A synthetic study could not be made as asked."""
