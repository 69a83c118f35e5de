"""The ways in: the milter, the ingest socket, the socketmap, and their UNIX-socket server."""
