"""rrstub: record, replay and reverse-debug whole KVM virtual machines."""

__version__ = "0.1.0"
