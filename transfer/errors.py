class TransferError(RuntimeError):
    """A transfer failed in a way the user can act on; the message says how."""
