"""``popauth follow``: logins read from a POP/IMAP server's log, reported to the ingest socket."""
