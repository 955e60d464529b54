"""invictusd: two Linux firewalls as one highly available firewall."""

__version__ = "0.1.0"
