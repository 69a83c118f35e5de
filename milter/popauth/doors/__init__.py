"""The ways in: the milter, the ingest socket, the socketmap, the policy door, and their UNIX-socket server."""
