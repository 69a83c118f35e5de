"""The processes beside a POP/IMAP server: ``popauth follow`` and ``popauth sessions``."""
