"""The ingest door: POP/IMAP login hooks report logins over a UNIX socket."""
